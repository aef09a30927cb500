"""Cross-attention as the pixel decoder (pixels -> words, L2VA) and the prototype generator (query ->
pixels, V2LA) use it (docs/architecture.md#cross-attention-with-separate-key-and-value-widths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.model import fast
from lgformer.model.fast.attention import (
    FEW_KEYS,
    few_keys_attention,
    folded_attention,
    folded_query_attention,
)
from lgformer.model.layers import LayerNorm, Linear, linear


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention + FFN: x <- LN(x + MHA(x + pos, k, v)); x <- LN(x + FFN(x)).

    Used for pixels -> words in the pixel decoder (L2VA) and for the prototype query -> pixels in the
    generator (V2LA). `kv_dim` may differ from `dim` (PyTorch MHA with kdim = vdim).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm_ca = LayerNorm(dim)
        self.ffn = nn.Sequential(Linear(dim, ffn), nn.ReLU(), nn.Dropout(0.0), Linear(ffn, dim))
        self.norm_ffn = LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = x if pos is None else x + pos
        x = self.norm_ca(x + multi_head_attention(self.cross_attn, query, key, value, key_padding_mask))
        first, last = self.ffn[0], self.ffn[3]  # ffn[2] is the authors' dropout, rate 0
        return self.norm_ffn(x + last(linear(x, first.weight, first.bias, "relu")))


def multi_head_attention(
    mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None
) -> Tensor:
    """`mha(query, key, value, key_padding_mask)[0]` for a batch-first module without dropout
    (docs/architecture.md#cross-attention-with-separate-key-and-value-widths).

    The same projections, scaled dot-product attention (padded keys at -inf) and output projection, with
    the projections on `linear` and no (L, B, E) round trips. query (B, Lq, E), key/value (B, Lk, kdim).
    Two algebraic forms need fewer multiply-adds where the keys and queries are lopsided; the result is
    the same up to rounding:
    - few queries, many keys (the prototype generator's one query over up to H/8·W/8 pixels): the key and
      value projections act on the query and the attended values instead of on every key
      (`folded_attention`);
    - many queries, few keys (the pixel decoder's pixels -> 20 words), in CPU inference: the query and
      output projections act on the keys and values instead of on every query
      (`folded_query_attention`). Training and GPUs keep the fused kernel, which stores no scores, except
      CPU bf16 training over few keys, which writes it out (`few_keys_attention`).
    """
    e, heads = mha.embed_dim, mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    mask = None
    if key_padding_mask is not None:
        mask = torch.zeros(key_padding_mask.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill_(key_padding_mask, float("-inf"))[:, None, None, :]  # (B, 1, 1, Lk)
    lq, (lk, kdim) = query.shape[1], key.shape[1:]
    # multiply-adds: folded 2·Lq·kdim·(E + heads·Lk) against 2·Lk·E·(kdim + Lq)
    if fast.enabled("attn-fold") and lq * kdim * (e + heads * lk) < lk * e * (kdim + lq):
        out = folded_attention(linear(query, wq, bq), key, value, wk, wv, bv, heads, mask)
        return linear(out.flatten(2), mha.out_proj.weight, mha.out_proj.bias)
    k, v = linear(key, wk, bk), linear(value, wv, bv)
    # multiply-adds per query: folded 2·heads·Lk·E against 2·E·(E + Lk)
    fold = query.device.type == "cpu" and not torch.is_grad_enabled() and heads * lk < e
    fold = fold and fast.enabled("xattn-fold")
    attend = folded_query_attention if fold else _projected_query_attention
    return attend(query, k, v, wq, bq, mha.out_proj.weight, mha.out_proj.bias, heads, mask)


def _projected_query_attention(
    query: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor,
    bq: Tensor | None,
    wo: Tensor,
    bo: Tensor | None,
    heads: int,
    mask: Tensor | None,
) -> Tensor:
    """`folded_query_attention` as written: every query projected, the fused kernel (`few_keys_attention` in
    CPU bf16 training over few keys), the output projection (training, GPUs, and where the fold has more
    multiply-adds)."""
    e = query.shape[-1]
    q, k, v = (t.unflatten(-1, (heads, e // heads)).transpose(1, 2) for t in (linear(query, wq, bq), k, v))
    explicit = q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
    if explicit and k.shape[-2] <= FEW_KEYS and fast.enabled("xattn-explicit"):
        out = few_keys_attention(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return linear(out.transpose(1, 2).flatten(2), wo, bo)
