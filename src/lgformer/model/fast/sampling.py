"""The deformable attention's CPU sampler: the `native-sampler`, `bag-sampler`, `bag-backward` and
`short-softmax` fast paths of `model/deformable_attention.py`.

`NativeSample` runs the C kernel `sampling.c` (built on first use, `native.py`): forward and backward one
pass each, the value head-major, the backward adding a head's channels at once; for MSDeformAttn it also
makes the locations from the raw offsets (no (B, Lq, heads, levels, points, 2) tensor, no autograd of its
arithmetic). Where it cannot be built, the embedding_bag sampler below runs.

`bag_sample` computes what `grid_sample_attention` computes (bilinear, zero padding, align_corners=False at
2·loc − 1, weighted and summed) as one weighted `embedding_bag` over the four integer neighbours of every
sampling point, all levels, heads and points at once: each level map gets a one-pixel zero border, so
clamped out-of-map neighbours read zeros, and the attention weight is folded into the bilinear weights.

Its backward is not `embedding_bag`'s, whose table gradient sorts every one of the B·Lq·heads·48 indices:
`BagSample` scatters with `grid_sampler_2d_backward` (the attention weight folded into the incoming
gradient) and gets the attention-weight gradient from a `grid_sampler_2d` gather, exact to rounding
(timings: README, "Speed").
"""

from __future__ import annotations

import ctypes
import itertools
import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from lgformer.model.common import tracing
from lgformer.model.fast import native
from lgformer.model.fast.native import fp32, pointer


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


@cache
def sampling_kernels() -> ctypes.CDLL | None:
    """`sampling.c` built and loaded with its signatures, or None where it cannot be built (warned once)."""
    return native.kernel(
        "sampling",
        returns=None,
        lgformer_sample_forward=native.signature(8, 8, 1),
        lgformer_sample_backward=native.signature(12, 8, 1),
    )


def native_applies(value: Tensor, locations: Tensor) -> bool:
    """Whether the C kernel can sample these: CPU tensors computed in float32 (not float64), not being traced
    (the kernel reads memory), kernel built."""
    return (
        value.device.type == "cpu"
        and not tracing()
        and torch.promote_types(compute_dtype(value), locations.dtype) == torch.float32
        and sampling_kernels() is not None
    )


class NativeSample(torch.autograd.Function):
    """The deformable sampling by the C kernel, forward and backward one pass each: value (B, S, heads, dh),
    weights (B, Lq, heads, levels, points) (or flat over levels·points), and the sampling points either as
    locations (B, Lq, heads, levels, points, 2) with `ref` None, as `ms_deform_attn_sample` takes them, or as
    MSDeformAttn's raw offsets (B, Lq, heads, levels·points·2) and reference points `ref` (B or 1, Lq, 2), the
    kernel then making the locations itself. Returns (B, Lq, heads·dh) in value's dtype; gradients for value,
    the locations or offsets, and the weights (none for the reference points)."""

    @staticmethod
    def forward(
        ctx, value: Tensor, points: Tensor, weights: Tensor, ref: Tensor | None, shapes: tuple
    ) -> Tensor:
        B, S, heads, dh = value.shape
        ctx.shapes, ctx.dtypes = shapes, (value.dtype, points.dtype, weights.dtype)
        points, weights, ref = fp32(points), fp32(weights), fp32(ref)
        # the kernel's maps: head-major (B, heads, S, dh) fp32, in one copy
        maps = value.new_empty(B, heads, S, dh, dtype=torch.float32).copy_(value.permute(0, 2, 1, 3))
        ctx.save_for_backward(maps, points, weights, ref)
        out = value.new_empty(B, points.shape[1], heads * dh, dtype=torch.float32)
        located = (points, weights, None, None) if ref is None else (None, weights, points, ref)
        tables, sizes = _kernel_arguments(maps, weights, ref, shapes)
        sampling_kernels().lgformer_sample_forward(*map(pointer, (maps, *located, out, *tables)), *sizes)
        return out.to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        maps, points, weights, ref = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        grad_maps = torch.zeros_like(maps) if need[0] else None
        grad_points = torch.empty_like(points) if need[1] else None
        grad_weights = torch.empty_like(weights) if need[2] else None
        located = (points, weights, None, None) if ref is None else (None, weights, points, ref)
        grads = (grad_points, grad_weights, None) if ref is None else (None, grad_weights, grad_points)
        tables, sizes = _kernel_arguments(maps, weights, ref, ctx.shapes)
        arrays = (maps, *located, fp32(grad), grad_maps, *grads, *tables)
        sampling_kernels().lgformer_sample_backward(*map(pointer, arrays), *sizes)
        value_dtype, points_dtype, weights_dtype = ctx.dtypes
        grad_value = None
        if grad_maps is not None:  # back to (B, S, heads, dh), in one copy
            B, heads, S, dh = grad_maps.shape
            grad_value = grad_maps.new_empty(B, S, heads, dh, dtype=value_dtype).copy_(
                grad_maps.permute(0, 2, 1, 3)
            )
        grad_points = None if grad_points is None else grad_points.to(points_dtype)
        grad_weights = None if grad_weights is None else grad_weights.to(weights_dtype)
        return grad_value, grad_points, grad_weights, None, None


def _kernel_arguments(maps: Tensor, weights: Tensor, ref: Tensor | None, shapes: tuple) -> tuple:
    """The level table (H, W per level; first pixel of each) and the sizes both kernels take after it."""
    B, heads, S, dh = maps.shape
    Lq, levels = weights.shape[1], len(shapes)
    points = math.prod(weights.shape[3:]) // levels  # weights (.., levels, points) or (.., levels·points)
    table = torch.tensor([[h, w] for h, w in shapes], dtype=torch.int64)
    starts = torch.tensor([0, *itertools.accumulate(h * w for h, w in shapes[:-1])], dtype=torch.int64)
    ref_batch = int(ref is not None and ref.shape[0] > 1)
    return (table, starts), (B, S, Lq, heads, dh, levels, points, ref_batch, torch.get_num_threads())


def bag_sample(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """The forward of `ms_deform_attn_sample` as one weighted `embedding_bag` (module docstring)."""
    B, S, heads, dh = value.shape
    _, Lq, _, levels, points, _ = locations.shape
    dtype = torch.promote_types(compute_dtype(value), locations.dtype)
    device = value.device

    # Zero-bordered maps, head-major: one zero row/column before each level map and two after it, so that
    # with x̃ clamped to [−1, W] both neighbours floor(x̃) and floor(x̃) + 1 lie in the bordered map.
    # Row of (y, x): (b*heads + h)*Sp + start_l + (y+1)*(W_l+3) + (x+1).
    padded = [(h + 3) * (w + 3) for h, w in shapes]
    starts = [0, *itertools.accumulate(padded[:-1])]
    Sp = sum(padded)
    itype = torch.int32 if B * heads * Sp < 2**31 else torch.int64
    table = value.new_zeros(B, heads, Sp, dh, dtype=dtype)
    maps = value.permute(0, 2, 1, 3).split([h * w for h, w in shapes], dim=2)
    for m, (h, w), start in zip(maps, shapes, starts):
        bordered = table[:, :, start : start + (h + 3) * (w + 3)].unflatten(2, (h + 3, w + 3))
        bordered[:, :, 1 : h + 1, 1 : w + 1].copy_(m.unflatten(2, (h, w)))
    table = table.view(B * heads * Sp, dh)

    # Per-point constants are expanded over the K = levels·points axis: every broadcast below then runs along
    # a contiguous axis of K (broadcasting size-1 inner axes is several times slower on CPU).
    K = levels * points
    per_point = torch.tensor(
        [[w, h, w + 3, start] for (h, w), start in zip(shapes, starts)], dtype=itype, device=device
    ).repeat_interleave(points, dim=0)  # (K, 4)
    size = per_point[:, :2].t().to(dtype)  # (xy, K): W and H of each point's level
    stride = per_point[:, 2]
    # Pixel coordinates x̃ = x·W − 0.5, ỹ = y·H − 0.5, laid out (B, Lq, heads, xy, K). Clamping to
    # [−1, size] changes no sample: beyond it both neighbours are border zeros, and at the clamp the
    # neighbour that is not a border zero gets weight 0.
    pix = torch.mul(locations.to(dtype).view(B, Lq, heads, K, 2).transpose(3, 4), size).sub_(0.5)
    pix = torch.clamp(pix, min=torch.tensor(-1.0, dtype=dtype, device=device), max=size)
    low = pix.floor()
    frac = pix.sub_(low)
    batch_head = torch.arange(B * heads, dtype=itype, device=device).view(B, 1, heads, 1)
    base = batch_head * Sp + (per_point[:, 3] + stride + 1)  # bordered (0, 0) of each point's level map
    # a NaN location (a diverged run) reads border zeros with NaN weights: its sample is NaN, as grid_sample's
    corner = low.nan_to_num(-1.0).to(itype)
    top_left = (corner[:, :, :, 1] * stride).add_(corner[:, :, :, 0]).add_(base)  # (B, Lq, heads, K)
    # Neighbour rows, (B, Lq, heads, y-corner, x-corner, K).
    rows = torch.stack([torch.zeros_like(stride), stride])[:, None]  # (y-corner, 1, K)
    index = top_left[:, :, :, None, None] + (rows + torch.tensor([[0], [1]], dtype=itype, device=device))

    # Bilinear weights times the attention weight, (B, Lq, heads, y-corner·x-corner, K), as
    # ((1 − fy)·a, fy·a) ⊗ (1 − fx, fx); products of (B, Lq, heads, K) slices, no broadcast over inner axes.
    fx, fy = frac.unbind(3)
    a = weights.to(dtype).view(B, Lq, heads, K)
    ay0, ay1 = (1 - fy) * a, fy * a
    gx0 = 1 - fx
    per_sample = torch.stack([ay0 * gx0, ay0 * fx, ay1 * gx0, ay1 * fx], dim=3)
    out = F.embedding_bag(
        index.view(B * Lq * heads, -1),
        table,
        per_sample_weights=per_sample.view(B * Lq * heads, -1),
        mode="sum",
    )
    return out.view(B, Lq, heads * dh).to(value.dtype)


class BagSample(torch.autograd.Function):
    """`bag_sample` forward; backward per level through `grid_sampler_2d_backward` (no index sort)."""

    @staticmethod
    def forward(ctx, value: Tensor, locations: Tensor, weights: Tensor, shapes: tuple) -> Tensor:
        ctx.shapes = shapes
        ctx.save_for_backward(value, locations, weights)
        return bag_sample(value, list(shapes), locations, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        value, locations, weights = ctx.saved_tensors
        shapes = ctx.shapes
        need_value, need_loc, need_weights = ctx.needs_input_grad[:3]
        B, S, heads, dh = value.shape
        _, Lq, _, levels, points, _ = locations.shape
        dtype = torch.promote_types(compute_dtype(value), locations.dtype)
        n = B * heads
        # grid_sample layout with the points before the queries: maps (B·heads, dh, H, W), grids
        # (B·heads, points, Lq, 2) at 2·loc − 1, so that the incoming gradient (B·heads, dh, 1, Lq) broadcasts
        # over a middle axis (a size-1 innermost axis broadcasts several times slower on CPU)
        g = grad.to(dtype).view(B, Lq, heads, dh).permute(0, 2, 3, 1).reshape(n, dh, 1, Lq)
        maps = value.to(dtype).permute(0, 2, 3, 1).split([h * w for h, w in shapes], dim=3)
        # (B, heads, levels, points, Lq, 2) and (B, heads, levels, points, Lq), each copied once into this
        # layout: the per-level products and samplers below then read contiguous rows
        grids = (2 * locations.to(dtype) - 1).permute(0, 2, 3, 4, 1, 5).contiguous()
        a = weights.to(dtype).permute(0, 2, 3, 4, 1).contiguous()
        grad_maps, grad_grids, grad_a = [], [], []
        for lvl, (h, w) in enumerate(shapes):
            v = maps[lvl].reshape(n, dh, h, w)
            grid = grids[:, :, lvl].reshape(n, points, Lq, 2)
            if need_value or need_loc:
                gv, gg = torch.ops.aten.grid_sampler_2d_backward(
                    g * a[:, :, lvl].reshape(n, 1, points, Lq), v, grid, 0, 0, False, [need_value, need_loc]
                )
                grad_maps.append(gv)
                grad_grids.append(gg)
            if need_weights:
                grad_a.append(torch.grid_sampler_2d(v, grid, 0, 0, False).mul_(g).sum(1))  # (n, points, Lq)
        grad_value = grad_loc = grad_weights = None
        if need_value:
            grad_value = torch.cat([gv.view(B, heads, dh, -1) for gv in grad_maps], dim=3)
            grad_value = grad_value.permute(0, 3, 1, 2).to(value.dtype)
        if need_loc:
            grad_loc = 2 * torch.stack([gg.view(B, heads, points, Lq, 2) for gg in grad_grids], dim=2)
            grad_loc = grad_loc.permute(0, 4, 1, 2, 3, 5).to(locations.dtype)
        if need_weights:
            grad_weights = torch.stack([ga.view(B, heads, points, Lq) for ga in grad_a], dim=2)
            grad_weights = grad_weights.permute(0, 4, 1, 2, 3).to(weights.dtype)
        return grad_value, grad_loc, grad_weights, None


def softmax_last(x: Tensor) -> Tensor:
    """`x.softmax(-1)` for a short last axis: on CPU through the (K, N) transpose, whose softmax kernel runs
    along N (faster for the 12 (level, point) logits of a head)."""
    if x.device.type != "cpu":
        return x.softmax(-1)
    return x.reshape(-1, x.shape[-1]).t().contiguous().softmax(0).t().reshape(x.shape)
