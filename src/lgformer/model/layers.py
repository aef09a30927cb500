"""Building blocks shared by the decoder boxes: sine position encoding, cross-attention layer, MLP."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn


@lru_cache(maxsize=64)
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
    """DETR sine encoding of an h x w map, flattened row-major: (h*w, dim), y half first (spec §4.2).

    Always fp32 and cached per size: it depends only on the map size.
    """
    return _sine_position_embedding(h, w, dim, torch.device(device))


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention + FFN: x <- LN(x + MHA(x + pos, k, v)); x <- LN(x + FFN(x)).

    Used for pixels -> words in the pixel decoder (L2VA) and for the prototype query -> pixels in the
    generator (V2LA). `kv_dim` may differ from `dim` (PyTorch MHA with kdim = vdim).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm_ca = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(0.0), nn.Linear(ffn, dim))
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = x if pos is None else x + pos
        attn = self.cross_attn(query, key, value, key_padding_mask=key_padding_mask, need_weights=False)[0]
        x = self.norm_ca(x + attn)
        return self.norm_ffn(x + self.ffn(x))


class MLP(nn.Sequential):
    """Linear-ReLU-Linear-ReLU-Linear (indices .0 .2 .4, as in the authors' head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )


def masked_mean(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: mean of real words, (B,T,D), (B,T) -> (B,1,D) (spec §5.1)."""
    m = mask.to(words.dtype).unsqueeze(-1)
    return (words * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1e-6)
