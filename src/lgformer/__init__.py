"""LGFormer: linguistic query-guided mask generation for referring image segmentation."""

__version__ = "0.1.0"
