"""GroupNorm's backward in CPU training: the `native-groupnorm` fast path of the pixel decoder's GroupNorms.

The forward is PyTorch's own (`native_group_norm`, the kernel `F.group_norm` runs, bit for bit); the backward
of a bf16 channels-last map (CPU bf16 autocast training) is the C kernel `groupnorm.c` (built on first use,
`native.py`): PyTorch's bf16 backward there runs several times slower than its fp32 one (in fp32 PyTorch's
is the faster, and is kept). The same formulas as PyTorch's, summed in fp32; the input gradient rounded to
bf16 once.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lgformer.model.common import tracing
from lgformer.model.fast import native
from lgformer.model.fast.native import fp32, pointer


@cache
def groupnorm_kernel() -> ctypes.CDLL | None:
    """`groupnorm.c` built and loaded with its signature, or None where it cannot be built (warned once)."""
    return native.kernel("groupnorm", lgformer_groupnorm_backward=native.signature(8, 4, 1))


def native_applies(x: Tensor) -> bool:
    """Whether the kernel takes this GroupNorm's backward: a channels-last bf16 CPU map, not being traced (the
    kernel reads memory), kernel built."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.bfloat16
        and x.is_contiguous(memory_format=torch.channels_last)
        and not tracing()
        and groupnorm_kernel() is not None
    )


class GroupNormFunction(torch.autograd.Function):
    """`F.group_norm(x, groups, weight, bias, eps)` on a channels-last map (`native_applies`); its backward by
    the C kernel."""

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float
    ) -> Tensor:
        B, C, H, W = x.shape
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, B, C, H * W, groups, eps)
        ctx.groups = groups
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        B, C, H, W = x.shape
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
        grad_weight = x.new_empty(C, dtype=torch.float32) if need_weight else None
        grad_bias = x.new_empty(C, dtype=torch.float32) if need_bias else None
        arrays = (x, grad, fp32(mean), fp32(rstd), fp32(weight), grad_x, grad_weight, grad_bias)
        sizes = (B, C, H * W, ctx.groups)
        failed = groupnorm_kernel().lgformer_groupnorm_backward(
            *map(pointer, arrays), *sizes, torch.get_num_threads()
        )
        native.check(failed, "groupnorm")
        return grad_x, *native.affine_grads(weight, grad_weight, grad_bias), None, None
