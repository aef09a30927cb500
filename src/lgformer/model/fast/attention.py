"""Algebraic forms of attention with fewer multiply-adds where keys and queries are lopsided: the
`attn-fold` and `xattn-fold` fast paths of `model/attention.py`'s `multi_head_attention`, and the
`vlba-fold` path of `model/fusion.py`'s `attend_normalised`; and its `xattn-explicit` path, attention over
few keys written out for CPU bf16 training."""

from __future__ import annotations

import torch
from torch import Tensor

from lgformer.model.fast.onednn import linear, onednn_dtype


def folded_query_attention(
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
    """Unprojected queries (B, Lq, E) over projected keys/values k, v (B, Lk, E) -> (B, Lq, E), output
    projection included.

    Per head h: (x W_q,hᵀ + β_q,h) k_hᵀ = x (k_h W_q,h)ᵀ + β_q,h·k_h and P_h v_h W_o,hᵀ = P_h (v_h W_o,hᵀ),
    so the products over the queries have heads·Lk columns instead of E. Two layouts of the scores, the
    faster for each precision (README, "Speed"): where fp32 products run on oneDNN, query-major
    (Lq, heads·Lk) per sample, both products oneDNN GEMMs over the query rows with the score offsets and
    the output bias as their biases, the softmax along each head's Lk keys; otherwise (bf16)
    (B, heads·Lk, Lq) by batched products, the softmax along a strided axis, which the CPU kernel
    vectorises over the queries.
    """
    b, lq, e = query.shape
    lk, d = k.shape[1], e // heads
    kh = (k * d**-0.5).view(b, lk, heads, d).transpose(1, 2)  # (B, heads, Lk, d)
    folded_q = torch.matmul(kh, wq.view(heads, d, e)).flatten(1, 2)  # (B, heads·Lk, E)
    # per (head, key) score offsets β_q,h·k_h, (B, heads, Lk, 1)
    bias = kh.new_zeros(b, heads, lk, 1) if bq is None else torch.matmul(kh, bq.view(heads, d, 1))
    if mask is not None:
        bias = bias + mask.view(b, 1, lk, 1)
    folded_v = torch.matmul(v.view(b, lk, heads, d).transpose(1, 2), wo.view(e, heads, d).permute(1, 2, 0))
    folded_v = folded_v.flatten(1, 2)  # (B, heads·Lk, E)
    if onednn_dtype(query, wq) == torch.float32:
        outs = [
            linear(linear(x, fq, c.flatten()).view(lq, heads, lk).softmax(-1).view(lq, -1), fv.t(), bo)
            for x, fq, c, fv in zip(query, folded_q, bias, folded_v)
        ]
        return outs[0].unsqueeze(0) if b == 1 else torch.stack(outs)
    scores = torch.baddbmm(bias.flatten(1, 2), folded_q, query.transpose(1, 2))  # (B, heads·Lk, Lq)
    p = scores.view(b, heads, lk, lq).softmax(-2).view(b, heads * lk, lq)
    out = torch.matmul(p.transpose(1, 2), folded_v)  # (B, Lq, E)
    return out if bo is None else out + bo


# the most keys `few_keys_attention` is taken for: its stored scores grow with the keys, and from 80 keys on
# it trains slower than the fused kernel (README, "Training speed")
FEW_KEYS = 40


def few_keys_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q kᵀ/√d + mask) v for bf16 q (B, heads, Lq, d) over few keys k, v (B, heads, Lk, d), written
    out as the fused kernel computes it: the scores in fp32 from the bf16 operands, the softmax in fp32, the
    probabilities rounded to bf16 for the product with v. On CPU the fused kernel's bf16 backward runs at a
    third of this speed for the pixel decoder's pixels -> 20 words; the (Lq, Lk) scores are small here."""
    scores = torch.matmul(q.float() * q.shape[-1] ** -0.5, k.float().transpose(-2, -1))
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


def folded_attention(
    q: Tensor,
    key: Tensor,
    value: Tensor,
    wk: Tensor,
    wv: Tensor,
    bv: Tensor | None,
    heads: int,
    mask: Tensor | None,
) -> Tensor:
    """Projected queries q (B, Lq, E) attend over unprojected keys/values (B, Lk, kdim) -> (B, Lq, heads, d).

    Per head h: q_h (K W_k,hᵀ + β_k,h)ᵀ = (q_h W_k,h) Kᵀ + a constant per query, which the softmax drops, and
    P (V W_v,hᵀ + β_v,h) = (P V) W_v,hᵀ + β_v,h because the rows of P sum to 1.
    """
    b, lq, e = q.shape
    d, kdim = e // heads, key.shape[-1]
    qh = (q * d**-0.5).view(b, lq, heads, d).transpose(1, 2)  # (B, heads, Lq, d)
    scores = torch.matmul(torch.matmul(qh, wk.view(heads, d, kdim)).flatten(1, 2), key.transpose(1, 2))
    if mask is not None:
        scores = scores + mask[:, 0]  # (B, heads·Lq, Lk)
    attended = torch.matmul(scores.softmax(-1), value).view(b, heads, lq, kdim)
    out = torch.matmul(attended, wv.view(heads, d, kdim).transpose(1, 2))  # (B, heads, Lq, d)
    if bv is not None:
        out = out + bv.view(heads, 1, d).to(out.dtype)
    return out.transpose(1, 2)


def folded_attend_normalised(p: Tensor, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`attend_normalised(p, x, layer)` (P_h · IN_N(x Wᵀ + b)_h, the instance norm over the N tokens) for a
    layer of weight W (D, C), without the (N, D) projection.

    The instance norm is affine per channel (the bias cancels) and the rows of P sum to 1, so with
    x̃ = x − mean_N(x): P·IN(x Wᵀ + b) = (P x̃) Wᵀ / sqrt(var + eps), var_d = w_d Σ w_dᵀ, Σ = x̃ᵀ x̃ / N,
    in fp32 from centred tokens (two-pass). Taken when its C·C·(N + D) multiply-adds are under a quarter of
    the product's N·C·D (VLBA's sym_value branch at 1/4 scale), so that it also pays against a bf16 product.
    """
    n, c = x.shape[1:]
    heads, d = p.shape[1], weight.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        # (B, C, N): the mean, the centring and Σ run along contiguous rows
        dtype = torch.promote_types(x.dtype, torch.float32)
        xt = x.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)
        centred = xt - xt.mean(2, keepdim=True)
        w = weight.to(dtype)
        cov = torch.matmul(centred, centred.transpose(1, 2)) / n  # (B, C, C)
        scale = torch.rsqrt((torch.matmul(w, cov) * w).sum(-1) + eps)  # (B, D)
    attended = torch.matmul(p, centred.transpose(1, 2)[:, None].to(p.dtype))  # (B, heads, T, C)
    attended = torch.matmul(attended, weight.view(heads, d // heads, c).transpose(1, 2))
    b, _, t, _ = attended.shape
    return attended.transpose(1, 2).reshape(b, t, d) * scale[:, None].to(attended.dtype)
