"""Swin window attention in window order: the `window-order` and `window-explicit` fast paths of
`model/swin.py`'s `WindowAttention`.

Instead of padding, rolling and cutting the map into windows, one cached permutation gathers the real
tokens in window order (`window_order`), only real tokens are projected and only real queries attend;
windows whose real tokens sit at the same positions are batched. The float masks of every block (bias
plus shift mask, rows of the real queries) are kept while the bias table is frozen. CPU inference writes
the attention out (matmul, add, softmax, matmul) in cache-sized chunks instead of calling the fused kernel
(timings: README, "Speed").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.model import fast
from lgformer.model.common import kept_while_unchanged, size_cache

# CPU inference attends in fp32 over chunks of windows whose scores fit this (`_explicit_attention`)
FP32_SCORES_CHUNK_BYTES = 2 << 20


class WindowGroup(NamedTuple):
    """Windows whose real (unpadded) tokens sit at the same in-window positions."""

    windows: Tensor  # (n,) int64 window indices (row-major over the padded grid)
    rows: Tensor | None  # (c,) int64 in-window positions of the real tokens; None: all w² are real


@size_cache()
def window_order(
    h: int, w: int, window: int, shift: int, device: torch.device
) -> tuple[Tensor, Tensor, tuple[WindowGroup, ...]]:
    """Token permutations for one block on an h x w map padded to Hp x Wp (cached).

    Returns (gather, scatter, groups):
    gather (Hp·Wp,) int64: window-order token t -> its row in the h·w real tokens, or h·w, the one row
    standing for every padded token; it combines the padding, the roll by -shift and the window partition
    (tokens row-major inside a window), with the windows ordered by `groups`.
    groups: `WindowGroup`s in that order; windows inside a group in row-major order.
    scatter (h·w,) int64: real token y·w + x -> its place among the real tokens of the gathered windows
    taken in order, which is the order in which the attention outputs of the real queries come out.
    Built from Python integers, so that tracing (export) sees only constants.
    """
    hp, wp = h + -h % window, w + -w % window
    pad = h * w
    patterns: dict[tuple[int, ...], list[int]] = {}
    tokens: list[list[int]] = []
    for wy in range(hp // window):
        for wx in range(wp // window):
            row = []
            for i in range(window):
                gy = (wy * window + i + shift) % hp
                for j in range(window):
                    gx = (wx * window + j + shift) % wp
                    row.append(gy * w + gx if gy < h and gx < w else pad)
            patterns.setdefault(tuple(k for k, t in enumerate(row) if t != pad), []).append(len(tokens))
            tokens.append(row)
    gather: list[int] = []
    queries: list[int] = []
    groups = []
    for rows, windows in patterns.items():
        for n in windows:
            gather += tokens[n]
            queries += [tokens[n][k] for k in rows]
        full = len(rows) == window * window
        groups.append(
            WindowGroup(
                torch.tensor(windows, device=device), None if full else torch.tensor(rows, device=device)
            )
        )
    scatter = [0] * pad
    for place, t in enumerate(queries):
        scatter[t] = place
    return torch.tensor(gather, device=device), torch.tensor(scatter, device=device), tuple(groups)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[:, index] for x (B, L, ...) and index (R,) -> (B, R, ...).

    One index_select along dim 0 of the (B·L, ...) view: on CPU that is faster than along dim 1.
    """
    b, n = x.shape[:2]
    if b > 1:
        index = (index + torch.arange(0, b * n, n, device=index.device).unsqueeze(1)).flatten()
    return x.reshape(b * n, *x.shape[2:]).index_select(0, index).view(b, -1, *x.shape[2:])


def window_masks(
    attn: nn.Module, h: int, w: int, shift: int, groups: tuple[WindowGroup, ...], dtype: torch.dtype
) -> list[Tensor]:
    """Bias (+ shift mask) rows of the real queries, one mask per window group of `window_order`:
    (1, heads, c, M) when shift == 0, else (windows, heads, c, M); c = M in a group of full windows.

    Cached while the bias table cannot receive gradients (and not while tracing: a traced table has
    no storage); the key holds the table's storage and version counter, so in-place updates
    (load_state_dict, optimiser steps) invalidate it.
    """
    table = attn.relative_position_bias_table
    if (torch.is_grad_enabled() and table.requires_grad) or torch.compiler.is_compiling():
        return _window_masks(attn, h, w, shift, groups, dtype)
    extra = (h, w, shift, dtype, table.device, torch.is_inference_mode_enabled())
    return kept_while_unchanged(
        attn, "_mask_cache", (table,), lambda: _window_masks(attn, h, w, shift, groups, dtype), extra
    )


def _window_masks(
    attn: nn.Module, h: int, w: int, shift: int, groups: tuple[WindowGroup, ...], dtype: torch.dtype
) -> list[Tensor]:
    win = attn.window
    mask = attn.attention_mask(h + -h % win, w + -w % win, shift).to(dtype)
    masks = []
    for group in groups:
        part = mask.index_select(0, group.windows) if shift and len(groups) > 1 else mask
        masks.append(part if group.rows is None else part.index_select(2, group.rows))
    return masks


def attend(attn: nn.Module, x: Tensor, shift: int) -> Tensor:
    """`WindowAttention.forward` of `attn` on x (B, H, W, C) -> (B, H, W, C), in one gather of the tokens.

    Only real tokens are projected and only real queries attend: a padded token is zero after LN1, so
    its key and value are the qkv bias (one extra row the window gather reads), and its output would be
    cropped. Windows with the same real positions are batched together (`window_order`).
    """
    b, hh, ww, c = x.shape
    h, win = attn.heads, attn.window
    hp, wp = hh + -hh % win, ww + -ww % win
    m = win * win
    gather, scatter, groups = window_order(hh, ww, win, shift, x.device)
    tokens = x.reshape(b, hh * ww, c)
    if hp * wp == hh * ww:  # no padding: partition the C-wide tokens, then project them in window order
        qkv = attn.qkv(gather_rows(tokens, gather))
    else:  # project the real tokens and one zero token, whose projection (the bias) the padded ones read
        qkv = gather_rows(attn.qkv(torch.cat([tokens, tokens.new_zeros(b, 1, c)], dim=1)), gather)
    qkv = qkv.view(b, hp * wp // m, m, 3, h, c // h)
    masks = window_masks(attn, hh, ww, shift, groups, qkv.dtype)
    outs, start = [], 0
    for group, mask in zip(groups, masks):
        part = qkv[:, start : start + len(group.windows)]
        start += len(group.windows)
        queries = part if group.rows is None else part.index_select(2, group.rows)
        q = queries[:, :, :, 0].transpose(2, 3)  # (B, n, heads, c, d)
        k, v = part[:, :, :, 1].transpose(2, 3), part[:, :, :, 2].transpose(2, 3)  # (B, n, heads, M, d)
        out = _window_attention(q, k, v, mask)
        outs.append(out.transpose(2, 3).reshape(b, -1, c))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return attn.proj(gather_rows(out, scatter)).view(b, hh, ww, c)


def _window_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + mask) v for q (B, n, heads, c, d), k, v (B, n, heads, M, d) and a mask
    (n or 1, heads, c, M) -> (B, n, heads, c, d).

    CPU inference and export take the explicit form: on CPU it is faster than the fused kernel for
    Swin's windows (fp32 and bf16), and the exporter's decomposition of SDPA lays its
    output out differently from the fused kernel's, which then fails on a later reshape (torch 2.13).
    CPU bf16 training takes `_bf16_training_attention`. Other training and GPUs keep the fused kernel, which
    does not store the (windows, heads, c, M) probabilities.
    """
    cpu = q.device.type == "cpu" and fast.enabled("window-explicit")
    if torch.compiler.is_exporting() or (cpu and not torch.is_grad_enabled()):
        return _explicit_attention(q, k, v, mask)
    if cpu and q.dtype == torch.bfloat16 and mask.requires_grad:
        return _bf16_training_attention(q, k, v, mask)
    return _fused_attention(q, k, v, mask)


def _bf16_training_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """`_window_attention` in CPU bf16 training, as the authors' explicit attention runs under autocast: the
    two products in bf16, the bias add and the softmax in fp32. The fused kernel takes no mask that needs a
    gradient (the trained bias table), so for it PyTorch falls back to its math form with every operand
    upcast to fp32, whose products leave a CPU's bf16 units idle (README, "Training speed")."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.contiguous().transpose(-2, -1))
    probabilities = (scores.float() + mask.float()).softmax(-1)
    return torch.matmul(probabilities.to(v.dtype), v)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """`_window_attention` as matmul, add, softmax, matmul; in fp32 over chunks of windows whose scores take
    at most `FP32_SCORES_CHUNK_BYTES`: larger ones leave the cache and make the products and the softmax
    memory-bound (README, "Speed"). bf16 gains nothing from chunks; export keeps one graph node per
    product."""
    b, n, heads, c, d = q.shape
    step = n
    if q.dtype == torch.float32 and not torch.compiler.is_exporting():
        step = max(1, FP32_SCORES_CHUNK_BYTES // (b * heads * c * k.shape[-2] * 4))
    if step >= n:
        return _attend(q, k, v, mask)
    out = q.new_empty(q.shape)
    for i in range(0, n, step):
        part = mask if mask.shape[0] == 1 else mask[i : i + step]
        _attend(q[:, i : i + step], k[:, i : i + step], v[:, i : i + step], part, out[:, i : i + step])
    return out


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor | None = None) -> Tensor:
    # k is a strided view of the qkv rows: copied as (M, d) rows, the product reads it transposed in place,
    # cheaper than the (d, M) copy matmul would make of kᵀ (same result)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.contiguous().transpose(-2, -1)).add_(mask)
    return torch.matmul(scores.softmax(-1), v, out=out)


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    b, n, heads, c, d = q.shape
    if b > 1 and mask.shape[0] > 1:
        # a per-window mask cannot broadcast over a (B·n) axis: fold the windows into the head axis
        fold = (b, n * heads)
        mask = mask.reshape(1, n * heads, c, -1)
    else:
        fold = (b * n, heads)
    out = F.scaled_dot_product_attention(
        q.reshape(*fold, c, d), k.reshape(*fold, -1, d), v.reshape(*fold, -1, d), attn_mask=mask
    )
    return out.view(b, n, heads, c, d)
