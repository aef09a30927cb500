"""No-target head (not in the paper; generalized referring segmentation, docs/architecture.md#no-target-head).

One logit per (image, expression): does anything in the image match? LGFormer's final linguistic prototype
already carries what the sentence found in the image (it attended to the pixel features in the prototype
generator), so a small MLP reads it (`prototype`). The `pooled` form also gives the MLP the mask features
averaged under the predicted mask and that mask's peak and mean probability: evidence read off the image
where the mask lands. Several objects need no head: their ground truth is the union of their masks.
"""

from __future__ import annotations

import torch
from torch import nn

from lgformer.model.layers import MLP

TARGET_INPUTS = ("prototype", "pooled")


class TargetHead(nn.Module):
    """forward(prototype (B,K,D), mask features (B,C,h,w), prediction logits (B,h,w)) -> (B,) "something
    matches" logits. K > 1 (learnable queries) is averaged."""

    def __init__(self, query_dim: int, mask_dim: int, inputs: str = "prototype") -> None:
        super().__init__()
        if inputs not in TARGET_INPUTS:
            raise ValueError(f"no-target head inputs must be one of {TARGET_INPUTS}, got {inputs!r}")
        self.pooled = inputs == "pooled"
        width = query_dim + (mask_dim + 2 if self.pooled else 0)
        self.mlp = MLP(width, query_dim, 1)

    def forward(
        self, prototype: torch.Tensor, mask_features: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor:
        x = prototype.mean(dim=1)
        if self.pooled:
            p = logits.float().sigmoid().flatten(1)  # (B, h·w)
            features = mask_features.float().flatten(2)  # (B, C, h·w)
            pooled = (features @ p[..., None])[..., 0] / p.sum(dim=1, keepdim=True).clamp_min(1e-6)
            peak, mean = p.amax(dim=1, keepdim=True), p.mean(dim=1, keepdim=True)
            x = torch.cat([x, pooled.to(x.dtype), peak.to(x.dtype), mean.to(x.dtype)], dim=1)
        return self.mlp(x)[:, 0]
