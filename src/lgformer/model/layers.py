"""Building blocks shared by the network: fast linear layers, sine position encoding, cross-attention, MLP.

`Linear` / `Conv1x1` compute exactly `nn.Linear` / a 1x1 `nn.Conv2d`, but an fp32 product on an x86 CPU
runs on oneDNN (`mkldnn._linear_pointwise`, AVX-512 kernels) instead of MKL's sgemm, which on AMD CPUs
takes an AVX2 path: about 2x faster there on Zen 5, 1.15x on Zen 4, identical up to summation order. Under
CPU bf16 autocast, inference casts the operands to bf16 as autocast does and calls the same oneDNN
primitive, so that ReLU/GELU/tanh are fused into the product there too. Inference keeps a parameter's
weight in oneDNN's blocked layout between calls (`_packed_weight`): always in bf16, in fp32 for products of
at least `FP32_PACK_ROWS` rows. `Conv3x3` computes a 3x3 convolution as Winograd F(4x4, 3x3) on the same
products in fp32 CPU inference. Everything else (fp16 autocast, bf16 training, GPU, other dtypes, tracing
and export) goes through `F.linear` unchanged.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from functools import cache, lru_cache, wraps
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.model import fast

ONEDNN = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)

# oneDNN's bf16 products need AVX-512 (or AVX-NE-CONVERT); elsewhere bf16 autocast keeps `F.linear`
ONEDNN_BF16 = ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()

# weights prepacked for oneDNN (`_packed_weight`); LGFORMER_PACK_WEIGHTS=0 saves their memory instead
PACK_WEIGHTS = (
    ONEDNN
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and os.environ.get("LGFORMER_PACK_WEIGHTS", "1") != "0"
)

# fp32 weights are packed for products of at least this many rows (`_packed_weight`)
FP32_PACK_ROWS = 512

T = TypeVar("T")

# glibc mallopt parameters (malloc.h)


def _onednn_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype at which `linear` runs x·Wᵀ on oneDNN: float32 for fp32 CPU tensors outside autocast,
    bfloat16 inside a CPU bf16 autocast region (casting as autocast would); None: through `F.linear`."""
    if not (
        ONEDNN
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.numel() > 0
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    ):
        return None
    if torch.is_autocast_enabled("cpu"):
        floating = x.dtype in (torch.float32, torch.bfloat16)
        bf16 = floating and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.bfloat16 if bf16 and ONEDNN_BF16 and fast.enabled("bf16-onednn") else None
    fp32 = x.dtype == weight.dtype == torch.float32
    return torch.float32 if fp32 and fast.enabled("onednn") else None


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(
        x, weight, bias, activation, [], "none" if activation == "gelu" else ""
    )


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with the forward and input-gradient products on oneDNN, the weight gradient on BLAS."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = _onednn_linear(grad, weight.t(), None) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        # the weight gradient reduces over all tokens: oneDNN would first copy both operands transposed,
        # BLAS reads them transposed in place (2-4x faster for these shapes)
        grad_w = torch.mm(flat.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = flat.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


def kept_while_unchanged(
    holder: object, attr: str, sources: tuple[Tensor, ...], build: Callable[[], T], extra: tuple = ()
) -> T:
    """`build()`, kept on `holder` as `attr` = (key, value) while every tensor of `sources` keeps its storage
    and version and `extra` (any other inputs of `build`) stays equal: in-place updates (optimiser steps,
    `load_state_dict`) and moves invalidate it. One entry: a new key replaces the old one.

    Tensors made under `torch.inference_mode` have no version counter, so in-place updates to them cannot
    be seen: for those nothing is kept and every call builds (a model made there runs, only slower).
    """
    if any(t.is_inference() for t in sources):
        return build()
    key = (*((t.data_ptr(), t._version) for t in sources), *extra)
    cached = getattr(holder, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, build())
        setattr(holder, attr, cached)
    return cached[1]


def _packed_weight(weight: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """`weight` for a oneDNN product at `dtype` (float32 or bfloat16) of `rows` input rows.

    A parameter keeps one copy per dtype in oneDNN's blocked layout (attributes `_onednn_bf16`,
    `_onednn_fp32`) while its storage and version stay the same, so that in-place updates (optimiser steps,
    `load_state_dict`) invalidate it. In bf16 a Swin-B forward otherwise re-reads every fp32 weight to cast
    it and oneDNN re-blocks every weight (6-9% of it on a 2-core Zen 4), for half the fp32 weights' memory.
    In fp32 the blocked weight makes large products 2-13% faster (identical results); it is kept only for
    products of `FP32_PACK_ROWS` rows or more (at 480: the pixel decoder and Swin's first three stages,
    about -60 ms of a 1.8 s Swin-B forward for 0.26 GB), since blocking every fp32 weight (Swin-B's last
    stage and BERT too) takes 0.9 GB, over the 2.5 GB memory target, for little more. Other tensors are
    cast each call.
    """
    fp32 = dtype == torch.float32
    packed = PACK_WEIGHTS and fast.enabled("prepack") and isinstance(weight, nn.Parameter)
    if not packed or (fp32 and rows < FP32_PACK_ROWS):
        return weight.to(dtype)
    return kept_while_unchanged(
        weight,
        "_onednn_fp32" if fp32 else "_onednn_bf16",
        (weight,),
        lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows),
    )


def drop_packed_weights(module: nn.Module) -> None:
    """Forget the weight copies `_packed_weight` keeps on `module`'s parameters (rebuilt on next use)."""
    for p in module.parameters():
        p.__dict__.pop("_onednn_bf16", None)
        p.__dict__.pop("_onednn_fp32", None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """`F.linear`, then `activation` (relu, exact gelu, tanh) if given: on oneDNN for CPU tensors in fp32
    outside autocast or in bf16 autocast (module docstring). Inference fuses the activation into the
    product; training runs fp32 products on oneDNN and bf16 ones through autocast's `F.linear`."""
    dtype = _onednn_dtype(x, weight)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if dtype is None or (grad and dtype != torch.float32):
        y = F.linear(x, weight, bias)
    elif grad:
        y = _OneDNNLinear.apply(x, weight, bias)
    else:
        w = _packed_weight(weight, dtype, x.shape[:-1].numel())
        b = None if bias is None else bias.to(dtype)
        if activation is None or fast.enabled("fused-act"):
            return _onednn_linear(x.to(dtype), w, b, activation or "none")
        y = _onednn_linear(x.to(dtype), w, b)
    return y if activation is None else ACTIVATIONS[activation](y)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv1x1(nn.Conv2d):
    """A 1x1 `nn.Conv2d` computed by `linear` over the channels-last view; returns a channels-last map."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if _onednn_dtype(x, weight) is None:
            return super()._conv_forward(x, weight, bias)
        return linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


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
        m[p] = _onednn_linear(v[p], weights[p], None)
    del v
    y = (at @ m.view(36, -1)).view(4, 4, b, th, tw, k)
    del m
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(b, 4 * th, 4 * tw, k)
    return y[:, :h, :w].contiguous().permute(0, 3, 1, 2)


# `Conv3x3` takes Winograd from this many input and output channels: below it the tile transforms, whose cost
# grows with the channels, eat what the products save (2-core Zen 4, fp32: 256 channels on a 120x120 map 49
# against 78 ms, on 80x80 19 against 34 ms; 128 channels even; 64 channels 9.5 against 5.1 ms)
WINOGRAD_MIN_CHANNELS = 256


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
            or _onednn_dtype(x, weight) != torch.float32
        ):
            return super()._conv_forward(x, weight, bias)
        rows = x.shape[0] * -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
        weights = kept_while_unchanged(self, "_winograd", (weight,), lambda: winograd_weights(weight, rows))
        return winograd_conv3x3(x, weights)


def size_cache(maxsize: int = 64) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """LRU cache for tensors that depend only on sizes (masks, orders, position tables).

    The body always runs outside inference mode and without autograd, so a table first built during an
    `inference_mode` validation can still be saved for backward by a later training step; while tracing
    nothing is cached.
    """

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False), torch.no_grad():
                return fn(*args)

        @wraps(fn)
        def call(*args):
            # While tracing (export, compile) build afresh: a traced tensor must not enter the cache.
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        call.cache_clear = cached.cache_clear
        return call

    return decorate


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


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention + FFN: x <- LN(x + MHA(x + pos, k, v)); x <- LN(x + FFN(x)).

    Used for pixels -> words in the pixel decoder (L2VA) and for the prototype query -> pixels in the
    generator (V2LA). `kv_dim` may differ from `dim` (PyTorch MHA with kdim = vdim).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm_ca = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(Linear(dim, ffn), nn.ReLU(), nn.Dropout(0.0), Linear(ffn, dim))
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
      (`_folded_attention`);
    - many queries, few keys (the pixel decoder's pixels -> 20 words), in CPU inference: the query and
      output projections act on the keys and values instead of on every query
      (`_folded_query_attention`). Training and GPUs keep the fused kernel, which stores no scores.
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
        out = _folded_attention(linear(query, wq, bq), key, value, wk, wv, bv, heads, mask)
        return linear(out.flatten(2), mha.out_proj.weight, mha.out_proj.bias)
    k, v = linear(key, wk, bk), linear(value, wv, bv)
    # multiply-adds per query: folded 2·heads·Lk·E against 2·E·(E + Lk)
    fold = query.device.type == "cpu" and not torch.is_grad_enabled() and heads * lk < e
    fold = fold and fast.enabled("xattn-fold")
    attend = _folded_query_attention if fold else _projected_query_attention
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
    """`_folded_query_attention` as written: every query projected, the fused kernel, the output projection
    (training, GPUs, and where the fold has more multiply-adds)."""
    e = query.shape[-1]
    q = linear(query, wq, bq)
    out = F.scaled_dot_product_attention(
        *(t.unflatten(-1, (heads, e // heads)).transpose(1, 2) for t in (q, k, v)), attn_mask=mask
    )
    return linear(out.transpose(1, 2).flatten(2), wo, bo)


def _folded_query_attention(
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
    faster for each precision (Zen 4, one 4725-pixel layer at 480): where fp32 products run on oneDNN,
    query-major (Lq, heads·Lk) per sample, both products oneDNN GEMMs over the query rows with the score
    offsets and the output bias as their biases, the softmax along each head's Lk keys (5.0 ms against
    7.1); otherwise (bf16: 3.4 ms against 4.3) (B, heads·Lk, Lq) by batched products, the softmax along a
    strided axis, which the CPU kernel vectorises over the queries.
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
    if _onednn_dtype(query, wq) == torch.float32:
        outs = [
            linear(linear(x, fq, c.flatten()).view(lq, heads, lk).softmax(-1).view(lq, -1), fv.t(), bo)
            for x, fq, c, fv in zip(query, folded_q, bias, folded_v)
        ]
        return outs[0].unsqueeze(0) if b == 1 else torch.stack(outs)
    scores = torch.baddbmm(bias.flatten(1, 2), folded_q, query.transpose(1, 2))  # (B, heads·Lk, Lq)
    p = scores.view(b, heads, lk, lq).softmax(-2).view(b, heads * lk, lq)
    out = torch.matmul(p.transpose(1, 2), folded_v)  # (B, Lq, E)
    return out if bo is None else out + bo


def _folded_attention(
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
