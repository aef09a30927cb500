"""EfficientNet-Lite2's depthwise convolutions on CPU: the `native-dw`, `dw-weight-grad` and `dw-strided-grad`
fast paths.

`StridedDepthwise` runs the stride-2 ones by the C kernel `depthwise.c` (built on first use, `native.py`),
forward and backward, on the unpadded channels-last map: the TensorFlow "SAME" padding is implicit, so the
padded copy of the map and its gradient's copy back are not made, and the bf16 input gradient is not
oneDNN's (below). Where it cannot be built, the two paths below take the backward.

For a depthwise kernel w of shape (C, 1, k, k) at stride s the weight gradient is, channel by channel, the
correlation of the input with the output gradient, summed over the batch:
dw[c, i, j] = Σ_b Σ_y,x g[b, c, y, x] · x[b, c, s·y + i, s·x + j]. That is itself one depthwise convolution:
the B·C input maps as channels, each with its own (H, W) output gradient as kernel, dilated by the stride,
then a sum over the B images. oneDNN computes it several times faster than its depthwise weight backward for
5x5 kernels (in fp32 and in bf16); for 3x3 ones its own backward is faster (README, "Training speed"), so
they keep it.

Under bf16 autocast, oneDNN's input gradient of a stride-2 depthwise convolution runs far slower than in
fp32 on the same maps; `dw-strided-grad` takes it in fp32 (a transposed convolution) and rounds it to bf16.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lgformer.model.common import tracing
from lgformer.model.fast import native
from lgformer.model.fast.native import pointer

MIN_KERNEL = 5  # the kernel size from which `weight_gradient` is taken


def weight_gradient(x: Tensor, grad: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """The gradient of a (C, 1, kernel, kernel) depthwise weight, from the input x (B, C, h, w) and the
    output gradient (B, C, H, W); summed over the batch in fp32, returned in x's dtype."""
    B, C, H, W = grad.shape
    h, w = x.shape[-2:]
    if stride == 1:
        maps = x.contiguous().view(1, B * C, h, w)
    else:  # the strided (dilated-kernel) form runs faster on channels-last maps
        maps = x.permute(2, 3, 0, 1).reshape(1, h, w, B * C).permute(0, 3, 1, 2)
    kernels = grad.contiguous().view(B * C, 1, H, W)
    per_image = F.conv2d(maps, kernels, None, 1, padding, stride, B * C)  # (1, B·C, kernel, kernel)
    total = per_image.view(B, C, kernel, kernel).sum(0, dtype=torch.promote_types(x.dtype, torch.float32))
    return total.unsqueeze(1).to(x.dtype)


def strided_input_gradient(
    grad: Tensor, weight: Tensor, stride: int, padding: int, size: list[int]
) -> Tensor:
    """The gradient of a depthwise convolution's (B, C, *size) input from its output gradient (B, C, H, W),
    computed in fp32 as a transposed convolution and returned in grad's dtype."""
    kernel = weight.shape[-1]
    extra = [n - ((m - 1) * stride - 2 * padding + kernel) for n, m in zip(size, grad.shape[-2:])]
    wide = F.conv_transpose2d(grad.float(), weight.float(), None, stride, padding, extra, weight.shape[0])
    return wide.to(grad.dtype)


class DepthwiseConvFunction(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, stride, padding, groups=C)`; in the backward the weight gradient by
    `weight_gradient` (`by_conv`) and the input gradient by `strided_input_gradient` (`input_fp32`), the
    others by oneDNN as before."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: int,
        padding: int,
        by_conv: bool,
        input_fp32: bool,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.by_conv, ctx.input_fp32 = stride, padding, by_conv, input_fp32
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        channels = weight.shape[0]
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        on_onednn = [need_x and not ctx.input_fp32, need_weight and not ctx.by_conv, False]
        grad_x = grad_weight = None
        if any(on_onednn):
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], channels, on_onednn
            )
        if need_x and ctx.input_fp32:
            grad_x = strided_input_gradient(grad, weight, s, p, list(x.shape[-2:]))
        if need_weight and ctx.by_conv:
            grad_weight = weight_gradient(x, grad, weight.shape[-1], s, p)
        grad_bias = grad.sum((0, 2, 3)) if need_bias else None
        return grad_x, grad_weight, grad_bias, None, None, None, None


@cache
def depthwise_kernel() -> ctypes.CDLL | None:
    """`depthwise.c` built and loaded with its signatures, or None where it cannot be built (warned once)."""
    return native.kernel(
        "depthwise",
        lgformer_dw2_forward=native.signature(4, 5, 2),
        lgformer_dw2_backward=native.signature(6, 5, 2),
    )


def native_applies(x: Tensor) -> bool:
    """Whether the C kernel takes this stride-2 depthwise convolution: a channels-last CPU map computed in
    fp32 or bf16 (the autocast dtype where autocast is on), not being traced (the kernel reads memory),
    kernel built."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return (
        x.device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and x.is_contiguous(memory_format=torch.channels_last)
        and not tracing()
        and depthwise_kernel() is not None
    )


class StridedDepthwise(torch.autograd.Function):
    """A (C, 1, k, k) depthwise convolution at stride 2 with TensorFlow "SAME" padding of the unpadded
    channels-last map x (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2)), by the C kernel, in x's dtype (fp32 or
    bf16, the weight and bias taken as they are, summed in fp32)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        k = weight.shape[-1]
        taps = weight.reshape(C, k * k).t().float().contiguous()  # (k·k, C): a tap's channels contiguous
        y = torch.empty(B, C, (H + 1) // 2, (W + 1) // 2, dtype=x.dtype, memory_format=torch.channels_last)
        flat_bias = None if bias is None else bias.float().contiguous()
        failed = depthwise_kernel().lgformer_dw2_forward(
            x.data_ptr(), taps.data_ptr(), pointer(flat_bias), y.data_ptr(), B, H, W, C, k,
            x.dtype == torch.bfloat16, torch.get_num_threads(),
        )  # fmt: skip
        native.check(failed, "depthwise")
        ctx.save_for_backward(x, taps)
        ctx.kernel = k
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, taps = ctx.saved_tensors
        B, C, H, W = x.shape
        k = ctx.kernel
        need_x, need_weight, need_bias = ctx.needs_input_grad
        g = grad.to(torch.float32).contiguous(memory_format=torch.channels_last)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
        grad_taps = taps.new_empty(k * k, C) if need_weight else None
        grad_bias = taps.new_empty(C) if need_bias else None
        failed = depthwise_kernel().lgformer_dw2_backward(
            x.data_ptr(), taps.data_ptr(), g.data_ptr(), pointer(grad_x), pointer(grad_taps),
            pointer(grad_bias), B, H, W, C, k, x.dtype == torch.bfloat16, torch.get_num_threads(),
        )  # fmt: skip
        native.check(failed, "depthwise")
        weight_dtype, bias_dtype = ctx.dtypes
        grad_weight = None if grad_taps is None else grad_taps.t().reshape(C, 1, k, k).to(weight_dtype)
        return grad_x, grad_weight, None if grad_bias is None else grad_bias.to(bias_dtype)


def _autocast_apply(
    function: type[torch.autograd.Function], x: Tensor, weight: Tensor, bias: Tensor | None, *args: object
) -> Tensor:
    """`function.apply(x, weight, bias, *args)`; under autocast in the autocast dtype, as `F.conv2d` runs."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return function.apply(x, weight, bias, *args)
    dtype = torch.get_autocast_dtype(device)
    x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
    with torch.autocast(device, enabled=False):
        return function.apply(x, weight, bias, *args)


def strided_depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`StridedDepthwise` (where `native_applies`), under autocast in the autocast dtype."""
    return _autocast_apply(StridedDepthwise, x, weight, bias)


def depthwise_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, by_conv: bool, input_fp32: bool
) -> Tensor:
    """A depthwise convolution (square kernel, same stride and padding on both axes) whose backward takes the
    gradients above; under autocast in the autocast dtype."""
    return _autocast_apply(DepthwiseConvFunction, x, weight, bias, stride, padding, by_conv, input_fp32)
