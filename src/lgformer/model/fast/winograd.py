"""Winograd F(4x4, 3x3) on oneDNN products: the `winograd` fast path of `Conv3x3` in fp32 CPU inference."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from lgformer.model.fast.onednn import PACK_WEIGHTS, onednn_linear

# Winograd F(4x4, 3x3) (Lavin & Gray, 2016) at the interpolation points 0, ±1, 1/2, -2 and ∞, which keep
# its fp32 error near the direct convolution's (Barabasz et al., 2020): the golden check's maximum difference
# goes from 4.3e-5 to 5.1e-5, where the usual points 0, ±1, ±2 take it to 7.7e-5. y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A
# for a 6x6 input tile d, a 3x3 kernel g and a 4x4 output tile y (cross-correlation, as conv2d).
WINOGRAD_BT = (
    (1, -1.5, -2, 1.5, 1, 0),
    (0, -1, 0.5, 2.5, 1, 0),
    (0, 1, -2.5, 0.5, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 0.5, -1, -0.5, 1, 0),
    (0, 1, -1.5, -2, 1.5, 1),
)
WINOGRAD_G = (
    (1, 0, 0),
    (1 / 3, 1 / 3, 1 / 3),
    (-1 / 3, 1 / 3, -1 / 3),
    (-16 / 15, -8 / 15, -4 / 15),
    (1 / 15, -2 / 15, 4 / 15),
    (0, 0, 1),
)
WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 0.5, -2, 0), (0, 1, 1, 0.25, 4, 0), (0, 1, -1, 0.125, -8, 1))


@cache
def _winograd_tile_transforms() -> tuple[Tensor, Tensor]:
    """Bᵀ ⊗ Bᵀ (36, 36) and Aᵀ ⊗ Aᵀ (16, 36) in fp32 (exact: their entries are dyadic)."""
    bt, at = torch.tensor(WINOGRAD_BT, dtype=torch.float64), torch.tensor(WINOGRAD_AT, dtype=torch.float64)
    return torch.kron(bt, bt).float(), torch.kron(at, at).float()


def winograd_weights(weight: Tensor, rows: int) -> list[Tensor]:
    """(K, C, 3, 3) kernel -> 36 (K, C) matrices G g Gᵀ, one per tile position (transformed in float64), as
    oneDNN weights for products of `rows` rows (blocked if `PACK_WEIGHTS`)."""
    g = torch.tensor(WINOGRAD_G, dtype=torch.float64)
    u = torch.einsum("ik,ockl,jl->ijoc", g, weight.detach().double(), g).flatten(0, 1).float()
    return [torch.ops.mkldnn._reorder_linear_weight(m, rows) if PACK_WEIGHTS else m.contiguous() for m in u]


def winograd_conv3x3(x: Tensor, weights: list[Tensor]) -> Tensor:
    """3x3 convolution, stride 1, zero padding 1, without bias, as Winograd F(4x4, 3x3) on oneDNN (fp32):
    x (B, C, H, W), `winograd_weights` of a (K, C, 3, 3) kernel -> (B, K, H, W) channels-last.

    36 products of (tiles, C) x (C, K) over the transformed 6x6 input tiles replace the 9·16 multiply-adds
    per tile of the direct form by 36 (4x fewer); the two tile transforms are (36, 36) and (16, 36) products.
    """
    b, c, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    bt, at = _winograd_tile_transforms()
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 4 * tw + 1 - w, 1, 4 * th + 1 - h))
    tiles = padded.unfold(1, 6, 4).unfold(2, 6, 4)  # (B, th, tw, C, 6, 6) view
    v = (bt @ tiles.permute(4, 5, 0, 1, 2, 3).reshape(36, -1)).view(36, -1, c)  # (36, tiles, C)
    k = weights[0].shape[0]
    m = v if k == c else v.new_empty(36, v.shape[1], k)  # (36, tiles, K), in v's memory where it fits
    for p in range(36):
        m[p] = onednn_linear(v[p], weights[p], None)
    del v
    y = (at @ m.view(36, -1)).view(4, 4, b, th, tw, k)
    del m
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(b, 4 * th, 4 * tw, k)
    return y[:, :h, :w].contiguous().permute(0, 3, 1, 2)


# `Conv3x3` takes Winograd from this many input and output channels: below it the tile transforms, whose cost
# grows with the channels, eat what the products save (measured: README, "Speed")
WINOGRAD_MIN_CHANNELS = 256
