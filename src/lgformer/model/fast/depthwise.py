"""The depthwise convolutions' backward in CPU training: the `dw-weight-grad` and `dw-strided-grad` fast paths
of EfficientNet-Lite2's depthwise convolutions.

For a depthwise kernel w of shape (C, 1, k, k) at stride s the weight gradient is, channel by channel, the
correlation of the input with the output gradient, summed over the batch:
dw[c, i, j] = Σ_b Σ_y,x g[b, c, y, x] · x[b, c, s·y + i, s·x + j]. That is itself one depthwise convolution:
the B·C input maps as channels, each with its own (H, W) output gradient as kernel, dilated by the stride,
then a sum over the B images. oneDNN computes it several times faster than its depthwise weight backward for
5x5 kernels (in fp32 and in bf16); for 3x3 ones its own backward is faster (README, "Training speed"), so
they keep it.

Under bf16 autocast, oneDNN's input gradient of a stride-2 depthwise convolution runs 5-30x slower than in
fp32 on the same maps; `dw-strided-grad` takes it in fp32 (a transposed convolution) and rounds it to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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


def depthwise_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, by_conv: bool, input_fp32: bool
) -> Tensor:
    """A depthwise convolution (square kernel, same stride and padding on both axes) whose backward takes the
    gradients above; under autocast it runs in the autocast dtype, as `F.conv2d` would."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return DepthwiseConvFunction.apply(x, weight, bias, stride, padding, by_conv, input_fp32)
    dtype = torch.get_autocast_dtype(device)
    x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
    with torch.autocast(device, enabled=False):
        return DepthwiseConvFunction.apply(x, weight, bias, stride, padding, by_conv, input_fp32)
