"""LayerNorm's backward in CPU bf16 training: the `native-layernorm` fast path of `layers.LayerNorm`.

The forward is PyTorch's own (`native_layer_norm`, the kernel `F.layer_norm` runs, bit for bit); the
backward of a bf16 input (CPU bf16 autocast training: LayerNorm follows its input's dtype there) is the C
kernel `layernorm.c` (built on first use, `native.py`). PyTorch's is slower there, most on short rows, and
sums the weight and bias gradients in bf16: over the 16,800 rows of a `lite` batch they come out ~10% off
(the kernel's, in fp32, within 1e-6; README, "Training speed"). The same formulas as PyTorch's; the input
gradient rounded to bf16 once.
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
def layernorm_kernel() -> ctypes.CDLL | None:
    """`layernorm.c` built and loaded with its signature, or None where it cannot be built (warned once)."""
    return native.kernel("layernorm", lgformer_layernorm_backward=native.signature(8, 2, 1))


def native_applies(x: Tensor, normalized_shape: tuple[int, ...]) -> bool:
    """Whether the kernel takes this LayerNorm's backward: a bf16 CPU input normalised over its last axis,
    not being traced (the kernel reads memory), kernel built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and len(normalized_shape) == 1
        and not tracing()
        and layernorm_kernel() is not None
    )


class LayerNormFunction(torch.autograd.Function):
    """`F.layer_norm(x, (D,), weight, bias, eps)` (`native_applies`); its backward by the C kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        x = x.contiguous()
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        D = x.shape[-1]
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad = grad.to(x.dtype).contiguous()
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        grad_weight = x.new_empty(D, dtype=torch.float32) if need_weight else None
        grad_bias = x.new_empty(D, dtype=torch.float32) if need_bias else None
        arrays = (x, grad, fp32(mean), fp32(rstd), fp32(weight), grad_x, grad_weight, grad_bias)
        failed = layernorm_kernel().lgformer_layernorm_backward(
            *map(pointer, arrays), x.numel() // D, D, torch.get_num_threads()
        )
        native.check(failed, "layernorm")
        return grad_x, *native.affine_grads(weight, grad_weight, grad_bias), None
