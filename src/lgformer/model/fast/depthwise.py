"""The depthwise convolutions' weight gradient in CPU training: the `dw-weight-grad` fast path of
EfficientNet-Lite2's 5x5 depthwise convolutions.

For a depthwise kernel w of shape (C, 1, k, k) at stride s the weight gradient is, channel by channel, the
correlation of the input with the output gradient, summed over the batch:
dw[c, i, j] = Σ_b Σ_y,x g[b, c, y, x] · x[b, c, s·y + i, s·x + j]. That is itself one depthwise convolution:
the B·C input maps as channels, each with its own (H, W) output gradient as kernel, dilated by the stride,
then a sum over the B images. oneDNN computes it several times faster than its depthwise weight backward for
5x5 kernels; for 3x3 ones its own backward is faster (README, "Training speed"), so they keep it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

MIN_KERNEL = 5  # the kernel size from which `depthwise_conv` is taken


def weight_gradient(x: Tensor, grad: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """The gradient of a (C, 1, kernel, kernel) depthwise weight, from the input x (B, C, h, w) and the
    output gradient (B, C, H, W)."""
    B, C, H, W = grad.shape
    h, w = x.shape[-2:]
    if stride == 1:
        maps = x.contiguous().view(1, B * C, h, w)
    else:  # the strided (dilated-kernel) form runs faster on channels-last maps
        maps = x.permute(2, 3, 0, 1).reshape(1, h, w, B * C).permute(0, 3, 1, 2)
    kernels = grad.contiguous().view(B * C, 1, H, W)
    per_image = F.conv2d(maps, kernels, None, 1, padding, stride, B * C)  # (1, B·C, kernel, kernel)
    return per_image.view(B, C, kernel, kernel).sum(0).unsqueeze(1)


class DepthwiseConvFunction(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, stride, padding, groups=C)`; its weight gradient by `weight_gradient`, the
    input gradient by oneDNN as before."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding, 1, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        s, p = ctx.stride, ctx.padding
        channels = weight.shape[0]
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], channels, [True, False, False]
            )[0]
        if need_weight:
            grad_weight = weight_gradient(x, grad, weight.shape[-1], s, p)
        if need_bias:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """A depthwise convolution (square kernel, same stride and padding on both axes) whose backward takes
    the weight gradient above."""
    return DepthwiseConvFunction.apply(x, weight, bias, stride, padding)
