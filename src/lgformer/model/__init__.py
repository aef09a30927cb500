"""The LGFormer network, one module per box of the paper's Figure 3."""
