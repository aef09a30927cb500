"""Multi-scale deformable attention (Deformable DETR), pure PyTorch,
docs/architecture.md#multi-scale-deformable-attention.

Bilinear sampling is exactly `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`
at `grid = 2·loc − 1`, which is what the authors' CUDA kernel computes (`grid_sample_attention`). On a CPU
the same sums are taken by a small C kernel built on first use, or where none can be built by one weighted
`embedding_bag` with its own backward (`model/fast/sampling.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.model import fast
from lgformer.model.fast.sampling import (
    BagSample,
    NativeSample,
    bag_sample,
    compute_dtype,
    native_applies,
    softmax_last,
)
from lgformer.model.layers import Linear


def ms_deform_attn_sample(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Attention-weighted bilinear samples of a multi-level value.

    value (B, S, heads, dh) with S = sum(H*W) levels concatenated coarse-to-fine in `shapes` order;
    locations (B, Lq, heads, levels, points, 2) normalised (x, y) in [0,1]; weights (B, Lq, heads, levels,
    points) -> (B, Lq, heads*dh). Computed in float32 (float64 for float64 inputs), returned in value's dtype.
    """
    S, levels = value.shape[1], locations.shape[3]
    if sum(h * w for h, w in shapes) != S or len(shapes) != levels:
        raise ValueError(f"value length {S} and {levels} sampled levels do not match level shapes {shapes}")
    if fast.enabled("native-sampler") and native_applies(value, locations):
        return NativeSample.apply(value, locations, weights, None, tuple(shapes))
    if not fast.enabled("bag-sampler"):
        return grid_sample_attention(value, shapes, locations, weights)
    grad = value.requires_grad or locations.requires_grad or weights.requires_grad
    if grad and torch.is_grad_enabled() and fast.enabled("bag-backward"):
        return BagSample.apply(value, locations, weights, tuple(shapes))
    return bag_sample(value, shapes, locations, weights)


def grid_sample_attention(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """`ms_deform_attn_sample` (same arguments and result) as the plain formulation: `grid_sample` per level
    (bilinear, zero padding, `align_corners=False`) at 2·location - 1, weighted and summed. The exporter
    and the fast path's tests use it."""
    B, _, heads, dh = value.shape
    _, Lq, _, levels, points, _ = locations.shape
    out_dtype, dtype = value.dtype, torch.promote_types(compute_dtype(value), locations.dtype)
    value, locations, weights = value.to(dtype), locations.to(dtype), weights.to(dtype)
    maps = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    samples = []
    for level, (h, w) in enumerate(shapes):
        v = maps[level].permute(0, 2, 3, 1).reshape(B * heads, dh, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(B * heads, Lq, points, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.cat(samples, dim=-1)  # (B*heads, dh, Lq, levels*points)
    attention = weights.transpose(1, 2).reshape(B * heads, 1, Lq, levels * points)
    return (stacked * attention).sum(-1).view(B, heads * dh, Lq).transpose(1, 2).to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with one reference point per query shared by all levels."""

    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = Linear(dim, heads * levels * points * 2)
        self.attention_weights = Linear(dim, heads * levels * points)
        self.value_proj = Linear(dim, dim)
        self.output_proj = Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """docs/architecture.md#initialisation: zero offset weights with a polar-grid bias, uniform
        attention, Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        grid = direction.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, self.points, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, shapes: list[tuple[int, int]]
    ) -> Tensor:
        """query (B, Lq, dim); reference_points (B or 1, Lq, 2) normalised (x, y), the same for all levels;
        value (B, S, dim) with S = sum(H*W) over `shapes` (H, W), coarse to fine -> (B, Lq, dim)."""
        B, Lq, _ = query.shape
        S = value.shape[1]
        heads, levels, points = self.heads, self.levels, self.points
        v = self.value_proj(value).view(B, S, heads, self.dim // heads)
        # Sampling offsets and attention logits stay in the weights' precision under autocast: they place the
        # samples (offsets of several pixels, where bf16 keeps only ~3 significant digits).
        with torch.autocast(query.device.type, enabled=False):
            q = query.to(self.sampling_offsets.weight.dtype)
            offsets = self.sampling_offsets(q).view(B, Lq, heads, levels * points * 2)
            logits = self.attention_weights(q).view(B, Lq, heads, levels * points)
        dtype = compute_dtype(offsets)
        logits = logits.to(dtype)
        softmax = softmax_last if fast.enabled("short-softmax") else lambda t: t.softmax(-1)
        weights = softmax(logits).view(B, Lq, heads, levels, points)
        if (
            fast.enabled("native-sampler")
            and native_applies(v, offsets)
            and not reference_points.requires_grad
        ):
            # the C kernel makes the locations below itself (model/fast/sampling.py)
            return self.output_proj(NativeSample.apply(v, offsets, weights, reference_points, tuple(shapes)))
        # (W, H) of each offset's level, and the reference point, repeated along the flat (level, point, xy)
        # axis so that the broadcasts run along it (see `bag_sample`)
        size = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=query.device)
        size = size[:, None].expand(levels, points, 2).flatten()
        ref = reference_points.to(dtype).repeat(1, 1, levels * points)[:, :, None]
        locations = (ref + offsets.to(dtype) / size).view(B, Lq, heads, levels, points, 2)
        return self.output_proj(ms_deform_attn_sample(v, shapes, locations, weights))
