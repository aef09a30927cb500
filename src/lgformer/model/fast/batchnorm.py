"""BatchNorm folded into the convolution before it: the `bn-fold` fast path of EfficientNet-Lite2 (one pass
over every activation less forward, and in training with frozen statistics the BN's backward passes too)."""

from __future__ import annotations

import torch
from torch import nn

from lgformer.model.common import kept_while_unchanged


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight w·γ/σ and bias β − μγ/σ (+ the conv's bias · γ/σ) of bn(conv(x)) for a BN in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), bias


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)) for a BN in eval mode, as one convolution with the folded weight and bias.

    With autograd on (training with frozen statistics, γ and β trained) the fold is built on every call and
    γ, β and w get their gradients through it; without, it is kept on `bn` while none of the five tensors
    changes (an in-place update or a move invalidates it)."""
    if torch.is_grad_enabled():
        weight, bias = fold(conv, bn)
    else:

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.inference_mode(False), torch.no_grad():
                return fold(conv, bn)

        tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        weight, bias = kept_while_unchanged(bn, "_folded", tensors, build, extra=(bn.eps,))
    return conv._conv_forward(x, weight, bias)
