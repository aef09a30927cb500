"""oneDNN products on x86 CPUs: the `onednn`, `bf16-onednn`, `prepack` and `fused-act` fast paths.

`linear` computes `F.linear` then an optional activation (relu, exact gelu, tanh): the product every
`Linear`, `Conv1x1` and the text encoder use. Where a fast path applies it takes oneDNN instead:
an fp32 product on an x86 CPU runs on oneDNN (`mkldnn._linear_pointwise`, AVX-512 kernels) instead of
MKL's sgemm, which on AMD CPUs takes a slower AVX2 path (so fp32 training takes it there only,
`ONEDNN_FP32_TRAINING`); the result is identical up to summation order. Under
CPU bf16 autocast, inference casts the operands to bf16 as autocast does and calls the same oneDNN
primitive, so that ReLU/GELU/tanh are fused into the product there too. Inference keeps a parameter's
weight in oneDNN's blocked layout between calls (`packed_weight`): always in bf16, in fp32 for products of
at least `FP32_PACK_ROWS` rows. `Conv3x3` computes a 3x3 convolution as Winograd F(4x4, 3x3) on the same
products in fp32 CPU inference. Everything else (fp16 autocast, bf16 training, GPU, other dtypes, tracing
and export) goes through `F.linear` unchanged.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.model import fast
from lgformer.model.common import ACTIVATIONS, kept_while_unchanged, tracing
from lgformer.precision import cpu_info

ONEDNN = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)

# fp32 training products on oneDNN (`OneDNNLinear`) pay where MKL's sgemm takes its AVX2 path (AMD CPUs);
# on Intel CPUs MKL runs AVX-512 kernels and, without inference's prepacked weights and fused activations,
# autograd through `F.linear` trains faster (README, "Training speed")
ONEDNN_FP32_TRAINING = ONEDNN and cpu_info().get("vendor_id") != "GenuineIntel"

# oneDNN's bf16 products need AVX-512 (or AVX-NE-CONVERT); elsewhere bf16 autocast keeps `F.linear`
ONEDNN_BF16 = ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()

# weights prepacked for oneDNN (`packed_weight`); LGFORMER_PACK_WEIGHTS=0 saves their memory instead
PACK_WEIGHTS = (
    ONEDNN
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and os.environ.get("LGFORMER_PACK_WEIGHTS", "1") != "0"
)

# fp32 weights are packed for products of at least this many rows (`packed_weight`)
FP32_PACK_ROWS = 512


def onednn_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype at which `linear` runs x·Wᵀ on oneDNN: float32 for fp32 CPU tensors outside autocast,
    bfloat16 inside a CPU bf16 autocast region (casting as autocast would); None: through `F.linear`."""
    if not (
        ONEDNN
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.numel() > 0
        and not tracing()
    ):
        return None
    if torch.is_autocast_enabled("cpu"):
        floating = x.dtype in (torch.float32, torch.bfloat16)
        bf16 = floating and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.bfloat16 if bf16 and ONEDNN_BF16 and fast.enabled("bf16-onednn") else None
    fp32 = x.dtype == weight.dtype == torch.float32
    return torch.float32 if fp32 and fast.enabled("onednn") else None


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(
        x, weight, bias, activation, [], "none" if activation == "gelu" else ""
    )


class OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with the forward and input-gradient products on oneDNN, the weight gradient on BLAS."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = onednn_linear(grad, weight.t(), None) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        # the weight gradient reduces over all tokens: oneDNN would first copy both operands transposed,
        # BLAS reads them transposed in place (faster for these shapes)
        grad_w = torch.mm(flat.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        grad_b = flat.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


def packed_weight(weight: Tensor, dtype: torch.dtype, rows: int) -> Tensor:
    """`weight` for a oneDNN product at `dtype` (float32 or bfloat16) of `rows` input rows.

    A parameter keeps one copy per dtype in oneDNN's blocked layout (attributes `_onednn_bf16`,
    `_onednn_fp32`) while its storage and version stay the same, so that in-place updates (optimiser steps,
    `load_state_dict`) invalidate it. In bf16 a forward otherwise re-reads every fp32 weight to cast it and
    oneDNN re-blocks every weight, for half the fp32 weights' memory. In fp32 the blocked weight makes large
    products faster (identical results); it is kept only for products of `FP32_PACK_ROWS` rows or more (at
    480: the pixel decoder and Swin's first three stages), since blocking every fp32 weight (Swin-B's last
    stage and BERT too) would cost memory for little more (figures: README, "Speed"). Other tensors are
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
    """Forget the weight copies `packed_weight` keeps on `module`'s parameters (rebuilt on next use)."""
    for p in module.parameters():
        p.__dict__.pop("_onednn_bf16", None)
        p.__dict__.pop("_onednn_fp32", None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """`F.linear`, then `activation` (relu, exact gelu, tanh) if given: on oneDNN for CPU tensors in fp32
    outside autocast or in bf16 autocast (module docstring). Inference fuses the activation into the
    product; training runs fp32 products on oneDNN (but on Intel CPUs, `ONEDNN_FP32_TRAINING`) and bf16 ones
    through autocast's `F.linear`."""
    dtype = onednn_dtype(x, weight)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if dtype is None or (grad and (dtype != torch.float32 or not ONEDNN_FP32_TRAINING)):
        y = F.linear(x, weight, bias)
    elif grad:
        y = OneDNNLinear.apply(x, weight, bias)
    else:
        w = packed_weight(weight, dtype, x.shape[:-1].numel())
        b = None if bias is None else bias.to(dtype)
        if activation is None or fast.enabled("fused-act"):
            return onednn_linear(x.to(dtype), w, b, activation or "none")
        y = onednn_linear(x.to(dtype), w, b)
    return y if activation is None else ACTIVATIONS[activation](y)
