"""Building blocks the boxes share: linear layers and 1x1 / 3x3 convolutions with `nn.Linear` /
`nn.Conv2d` parameters, GroupNorm and LayerNorm, the sine position encoding, the MLP and the sentence mean.
They may take the CPU fast paths of `model/fast/` (oneDNN, Winograd, C kernels); what they compute is the
plain layer's result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lgformer.model import fast
from lgformer.model.common import kept_while_unchanged, size_cache
from lgformer.model.fast import groupnorm, layernorm
from lgformer.model.fast.onednn import linear, onednn_dtype
from lgformer.model.fast.winograd import WINOGRAD_MIN_CHANNELS, winograd_conv3x3, winograd_weights

__all__ = [
    "MLP",
    "Conv1x1",
    "Conv3x3",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "linear",
    "masked_mean",
    "sine_position_embedding",
]


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv1x1(nn.Conv2d):
    """A 1x1 `nn.Conv2d` computed by `linear` over the channels-last view; returns a channels-last map."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if onednn_dtype(x, weight) is None:
            return super()._conv_forward(x, weight, bias)
        return linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


class Conv3x3(nn.Conv2d):
    """A 3x3, stride-1, padding-1 `nn.Conv2d` without bias; fp32 CPU inference on oneDNN computes it as
    Winograd F(4x4, 3x3) (`winograd_conv3x3`) from `WINOGRAD_MIN_CHANNELS` channels, with an fp32 rounding
    error of the same order as the direct one's. Training, bf16 and export keep `conv2d`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)
        self.winograd = min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS
        self._winograd: tuple[tuple, list[Tensor]] | None = None

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (
            not self.winograd
            or torch.is_grad_enabled()
            or torch.compiler.is_exporting()
            or not fast.enabled("winograd")
            or onednn_dtype(x, weight) != torch.float32
        ):
            return super()._conv_forward(x, weight, bias)
        rows = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
        weights = kept_while_unchanged(self, "_winograd", (weight,), lambda: winograd_weights(weight, rows))
        return winograd_conv3x3(x, weights)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and state-dict keys); in CPU training on a bf16 channels-last map its
    backward takes the `native-groupnorm` fast path (`model/fast/groupnorm.py`)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and fast.enabled("native-groupnorm") and groupnorm.native_applies(x):
            return groupnorm.GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and state-dict keys); in CPU training on a bf16 input its backward
    takes the `native-layernorm` fast path (`model/fast/layernorm.py`)."""

    def forward(self, x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and fast.enabled("native-layernorm")
        if grad and layernorm.native_applies(x, self.normalized_shape):
            return layernorm.LayerNormFunction.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)


@size_cache()
def _sine_position_embedding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    half = dim // 2
    y = (torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * 2 * math.pi)[:, None]
    x = (torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * 2 * math.pi)[:, None]
    k = torch.arange(half, dtype=torch.float32, device=device)
    tau = 10000 ** (2 * torch.div(k, 2, rounding_mode="floor") / half)
    py, px = y / tau, x / tau  # (h, half), (w, half)
    py = torch.where(k.long() % 2 == 0, py.sin(), py.cos())
    px = torch.where(k.long() % 2 == 0, px.sin(), px.cos())
    pe = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], dim=-1)
    return pe.reshape(h * w, dim)


def sine_position_embedding(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """DETR sine encoding of an h x w map, flattened row-major: (h*w, dim), y half first
    (docs/architecture.md#sine-position-encoding).

    Always fp32 and cached per size: it depends only on the map size.
    """
    return _sine_position_embedding(h, w, dim, torch.device(device))


class MLP(nn.Sequential):
    """Linear-ReLU-Linear-ReLU-Linear (indices .0 .2 .4, as in the authors' head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(
            Linear(in_dim, hidden), nn.ReLU(), Linear(hidden, hidden), nn.ReLU(), Linear(hidden, out_dim)
        )


def masked_mean(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: mean of real words, (B,T,D), (B,T) -> (B,1,D)
    (docs/architecture.md#sentence-query)."""
    m = mask.to(words.dtype).unsqueeze(-1)
    return (words * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1e-6)
