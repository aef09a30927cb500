"""BatchNorm folded into the convolution before it: the `bn-fold` fast path of EfficientNet-Lite2 in
inference (one pass over every activation less)."""

from __future__ import annotations

import torch
from torch import nn

from lgformer.model.common import kept_while_unchanged


def folded_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)) for a BN in eval mode, as one convolution with weight w·γ/σ and bias β − μγ/σ, kept on
    `bn` while none of the five tensors changes (an in-place update or a move invalidates them)."""

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False), torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            return conv.weight * scale.view(-1, 1, 1, 1), bias

    tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    weight, bias = kept_while_unchanged(bn, "_folded", tensors, fold, extra=(bn.eps,))
    return conv._conv_forward(x, weight, bias)
