"""Multi-scale deformable attention (Deformable DETR), pure PyTorch, spec §4.4.

Bilinear sampling is exactly `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`
at `grid = 2·loc − 1`, which is what the authors' CUDA kernel computes. It is implemented as one
weighted `embedding_bag` over the four integer neighbours of every sampling point, all levels, heads
and points at once: each level map gets a one-pixel zero border, so clamped out-of-map neighbours
read zeros, and the attention weight is folded into the bilinear weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def ms_deform_attn_sample(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Attention-weighted bilinear samples of a multi-level value.

    value (B, S, heads, dh) with S = sum(H*W) levels concatenated coarse-to-fine in `shapes` order;
    locations (B, Lq, heads, levels, points, 2) normalised (x, y) in [0,1]; weights (B, Lq, heads, levels,
    points) -> (B, Lq, heads*dh). Computed in float32 (float64 for float64 inputs), returned in value's dtype.
    """
    B, S, heads, dh = value.shape
    _, Lq, _, levels, points, _ = locations.shape
    if sum(h * w for h, w in shapes) != S or len(shapes) != levels:
        raise ValueError(f"value length {S} and {levels} sampled levels do not match level shapes {shapes}")
    dtype = torch.promote_types(_compute_dtype(value), locations.dtype)
    device = value.device

    # Zero-bordered maps, head-major: row ((b*heads + h)*Sp + start_l + (y+1)*(W_l+2) + (x+1)).
    padded = [(h + 2) * (w + 2) for h, w in shapes]
    Sp = sum(padded)
    itype = torch.int32 if B * heads * Sp < 2**31 else torch.int64
    maps = value.to(dtype).permute(0, 2, 1, 3).split([h * w for h, w in shapes], dim=2)
    table = torch.cat(
        [F.pad(m.unflatten(2, hw), (0, 0, 1, 1, 1, 1)).flatten(2, 3) for m, hw in zip(maps, shapes)], dim=2
    ).view(B * heads * Sp, dh)

    wh = torch.tensor([[w for _, w in shapes], [h for h, _ in shapes]], dtype=itype, device=device)
    size = wh.to(dtype)[:, :, None]  # (W, H) by level
    # Pixel coordinates x̃ = x·W − 0.5, ỹ = y·H − 0.5, laid out (B, Lq, heads, xy, levels, points);
    # clamping to [−2, size+1] only affects points whose neighbours are all off the map.
    pix = (locations.to(dtype).movedim(-1, 3).contiguous() * size - 0.5).clamp(max=size + 1).clamp_(min=-2.0)
    low = pix.floor()
    frac = pix - low
    # Neighbour coordinates in the bordered map, (B, Lq, heads, xy, corner, levels, points).
    corner = low.to(itype)[:, :, :, :, None] + torch.tensor([0, 1], dtype=itype, device=device).view(2, 1, 1)
    corner = torch.minimum(corner.clamp_(min=-1), wh.view(2, 1, levels, 1)) + 1
    start = torch.tensor([0, *padded[:-1]], dtype=itype, device=device).cumsum(0, dtype=itype)
    batch_head = torch.arange(B * heads, dtype=itype, device=device).view(B, 1, heads, 1, 1, 1)
    base = batch_head * Sp + start.view(levels, 1)
    row = corner[:, :, :, 1] * (wh[0] + 2).view(levels, 1) + base  # (B, Lq, heads, y-corner, ...)
    index = row[:, :, :, :, None] + corner[:, :, :, 0, None]  # (B, Lq, heads, y-corner, x-corner, ...)

    bilinear = torch.stack([1 - frac, frac], dim=4)  # (B, Lq, heads, xy, corner, levels, points)
    wy = bilinear[:, :, :, 1] * weights.to(dtype)[:, :, :, None]
    per_sample = wy[:, :, :, :, None] * bilinear[:, :, :, 0, None]
    out = F.embedding_bag(
        index.view(B * Lq * heads, -1),
        table,
        per_sample_weights=per_sample.view(B * Lq * heads, -1),
        mode="sum",
    )
    return out.view(B, Lq, heads * dh).to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with one reference point per query shared by all levels."""

    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §9: zero offset weights with a polar-grid bias, uniform attention, Xavier projections."""
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
        offsets = self.sampling_offsets(query).view(B, Lq, heads, levels, points, 2)
        logits = self.attention_weights(query).view(B, Lq, heads, levels * points)
        dtype = _compute_dtype(offsets)
        weights = logits.to(dtype).softmax(-1).view(B, Lq, heads, levels, points)
        size = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=query.device)  # (levels, (W, H))
        ref = reference_points.to(dtype)[:, :, None, None, None, :]
        locations = ref + offsets.to(dtype) / size[:, None, :]
        return self.output_proj(ms_deform_attn_sample(v, shapes, locations, weights))
