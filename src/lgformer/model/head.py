"""Prediction head (Fig. 3, "Mask generation"; docs/architecture.md#mask-head).

A 3-layer MLP maps each prototype to a dynamic 1x1 kernel (+ a scalar bias, as the authors do); the
mask logits are the dot product of that kernel with the 1/4-scale mask features. With K learnable
queries (Table 2 baseline) the K masks are merged per pixel by a 3-layer MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from lgformer.model.layers import MLP

MERGE_HIDDEN = 32


class MaskHead(nn.Module):
    """forward(queries [(B,K,D)] x n, mask features (B,C,h,w)) -> (B, n, h, w) logits, one per prototype."""

    def __init__(self, query_dim: int, mask_dim: int, bias: bool = True, merge_queries: int = 0) -> None:
        super().__init__()
        self.mask_dim = mask_dim
        self.bias = bias
        self.mlp = MLP(query_dim, query_dim, mask_dim + int(bias))
        self.merge = MLP(merge_queries, MERGE_HIDDEN, 1) if merge_queries else None

    def forward(self, queries: list[torch.Tensor], mask_features: torch.Tensor) -> torch.Tensor:
        b, k = queries[0].shape[:2]
        z = self.mlp(torch.cat(queries, dim=1))  # (B, n*K, C[+1]), all prototypes in one pass
        h, w = mask_features.shape[-2:]
        # (B, h·w, C) x (B, C, n·K): the decoder's channels-last features are read in place, not transposed
        pixels = mask_features.permute(0, 2, 3, 1).flatten(1, 2).to(z.dtype)
        logits = pixels @ z[..., : self.mask_dim].transpose(1, 2)
        if self.bias:
            logits = logits + z[:, None, :, self.mask_dim]
        logits = logits.transpose(1, 2).contiguous().unflatten(-1, (h, w))  # (B, n·K, h, w)
        if self.merge is not None:
            per_pixel = logits.view(b, len(queries), k, h, w).permute(0, 1, 3, 4, 2)
            logits = self.merge(per_pixel).squeeze(-1)
        return logits
