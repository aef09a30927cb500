"""Fast paths compute what the plain PyTorch formulation computes; bf16 autocast keeps the masks; bench runs.

No timings are asserted here: speed is measured by `lgformer bench` (README, "Speed").
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import OFFICIAL, load_benchmark
from torch import nn

from lgformer.cli import main
from lgformer.engine.metrics import two_sided_iou
from lgformer.errors import LGFormerError
from lgformer.model import fast
from lgformer.model.attention import multi_head_attention
from lgformer.model.deformable_attention import ms_deform_attn_sample
from lgformer.model.fast import onednn, winograd
from lgformer.model.fusion import attend_normalised
from lgformer.model.layers import Conv1x1, Conv3x3, Linear, linear
from lgformer.precision import cpu_info

GOLDEN = OFFICIAL / "golden_tiny_w7_224.safetensors"
NEEDS_ONEDNN_BF16 = pytest.mark.skipif(
    not onednn.ONEDNN_BF16,
    reason="oneDNN's bf16 products need AVX-512 or AVX-NE-CONVERT; this CPU has neither",
)


@pytest.mark.parametrize("decoder_fp32", [True, False])
def test_bf16_masks_agree_with_fp32_golden(decoder_fp32: bool) -> None:
    """Issue 6: under bf16 autocast the recipe model's masks (logit > 0) match the fp32 golden masks. The
    golden masks cover 99.4% of their pixels, so agreement is the IoU of the smaller side: an all-object
    prediction scores 0 (pixel agreement would give it 0.994)."""
    from safetensors.torch import load_file

    from lgformer.convert.verify import build_recipe_model

    assert GOLDEN.is_file(), f"golden file not found at {GOLDEN}"
    data = load_file(GOLDEN)
    model = build_recipe_model("tiny-w7")
    model.pixel_decoder.fp32 = decoder_fp32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(data["image"], data["text_mask"], text_features=data["text_features"])
    golden = data["logits_6"][:, 0] > 0
    assert two_sided_iou(torch.ones_like(golden), golden) == 0.0  # what pixel agreement let pass
    assert two_sided_iou(logits[:, -1].float() > 0, golden) >= 0.9  # measured 0.961 (0.920 bf16 decoder)


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_fp32_encoder_stages_under_autocast_are_the_fp32_computation(preset: str) -> None:
    """`model.encoder_fp32_stages=k`: under bf16 autocast the first k responses F_i are bit for bit the plain
    fp32 ones, the later ones are bf16 computations; `model.decoder_fp32` sets the pixel decoder's mode."""
    from lgformer import config as config_mod
    from lgformer.model.build import build_model

    torch.manual_seed(0)
    cfg = config_mod.load(preset, ["model.encoder_fp32_stages=2", "model.decoder_fp32=false"])
    model = build_model(cfg.model, pretrained=False).eval()
    assert model.pixel_decoder.fp32 is False and model.image_encoder.fp32_stages == 2
    image = torch.randn(1, 3, 64, 64)
    words = torch.randn(1, 6, model.text_encoder.dim)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.inference_mode():
        fp32, _ = model.image_encoder(image, words, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = model.image_encoder(image, words, mask)
    for i in (0, 1):
        assert mixed[i].dtype == torch.float32 and torch.equal(mixed[i], fp32[i]), i
    for i in (2, 3):
        assert not torch.equal(mixed[i].float(), fp32[i]), i
        assert ((mixed[i].float() - fp32[i]).norm() / fp32[i].norm()).item() < 0.05, i  # bf16 rounding


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "tanh"])
def test_linear_matches_f_linear_with_gradients(activation: str | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 40, 24).transpose(0, 1)  # non-contiguous input
    w, b = torch.randn(16, 24) * 0.2, torch.randn(16)
    ref_fn = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
    with torch.no_grad():
        torch.testing.assert_close(
            linear(x, w, b, activation), ref_fn(F.linear(x, w, b)), rtol=1e-5, atol=1e-5
        )
    grads = []
    forms = [lambda *a: linear(*a, activation), lambda *a: ref_fn(F.linear(*a))]
    if onednn.ONEDNN:  # oneDNN's own training product, whichever form `linear` trains with on this CPU
        forms.append(lambda *a: ref_fn(onednn.OneDNNLinear.apply(*a)))
    for fn in forms:
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        fn(*inputs).square().sum().backward()
        grads.append([t.grad for t in inputs])
    for other in grads[:1] + grads[2:]:
        for got, expected in zip(other, grads[1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("on_onednn", [True, False])
def test_fp32_training_products_take_onednn_only_where_it_is_chosen(
    monkeypatch: pytest.MonkeyPatch, on_onednn: bool
) -> None:
    """fp32 training products run on oneDNN where `ONEDNN_FP32_TRAINING` says (not on Intel CPUs, whose MKL
    sgemm trains faster), else through autograd's `F.linear`; inference stays on oneDNN either way."""
    monkeypatch.setattr(onednn, "ONEDNN_FP32_TRAINING", on_onednn)
    x, w = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True)
    name = type(linear(x, w).grad_fn).__name__
    assert (name == "OneDNNLinearBackward") == (on_onednn and onednn.ONEDNN)
    assert name == "OneDNNLinearBackward" or name.startswith("MmBackward")


def test_onednn_fp32_training_follows_the_cpu_vendor() -> None:
    intel = cpu_info().get("vendor_id") == "GenuineIntel"
    assert onednn.ONEDNN_FP32_TRAINING == (onednn.ONEDNN and not intel)


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "tanh"])
def test_linear_under_bf16_autocast_is_autocasts_product(activation: str | None) -> None:
    """Inference under CPU bf16 autocast: bf16 out, within bf16 rounding of autocast's F.linear + activation
    (the fused activation is applied before the one rounding); with gradients it is autocast's own path."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 24).transpose(0, 1)
    w, b = torch.randn(16, 24) * 0.2, torch.randn(16)
    ref_fn = {None: lambda t: t, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[activation]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            got, expected = linear(x, w, b, activation), ref_fn(F.linear(x, w, b))
        assert got.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
        w.requires_grad_()
        w_ref = w.detach().clone().requires_grad_()
        y, y_ref = linear(x, w, b, activation), ref_fn(F.linear(x, w_ref, b))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    y_ref.float().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=0)


@pytest.mark.skipif(not onednn.PACK_WEIGHTS, reason="oneDNN weight prepacking is an x86 CPU path")
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=NEEDS_ONEDNN_BF16), torch.float32])
def test_parameters_are_prepacked_once_and_follow_in_place_updates(dtype: torch.dtype) -> None:
    """In inference (bf16 autocast, or fp32 products of FP32_PACK_ROWS rows or more) a parameter's weight is
    cast and blocked for oneDNN once; the products match F.linear's at any number of rows, and an in-place
    update of the parameter is picked up."""
    torch.manual_seed(0)
    layer = Linear(48, 32)
    rows = onednn.FP32_PACK_ROWS if dtype == torch.float32 else 7
    x = torch.randn(1, rows, 48)
    attr = "_onednn_fp32" if dtype == torch.float32 else "_onednn_bf16"
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}

    def expected(inputs: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(inputs, layer.weight, layer.bias)).float()

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with torch.inference_mode():
            first = linear(x, layer.weight, layer.bias, "gelu")
            assert first.dtype == dtype
            packed = getattr(layer.weight, attr)[1]
            again = linear(x[:, :5], layer.weight, layer.bias, "gelu")  # fewer rows, same packed weight
            assert getattr(layer.weight, attr)[1] is packed and packed.is_mkldnn
            torch.testing.assert_close(first.float(), expected(x), **tol)
            torch.testing.assert_close(again.float(), first[:, :5].float(), **tol)
        with torch.no_grad():
            layer.weight.mul_(-1.0)
        with torch.inference_mode():
            flipped = linear(x, layer.weight, layer.bias, "gelu")
            assert getattr(layer.weight, attr)[1] is not packed
            torch.testing.assert_close(flipped.float(), expected(x), **tol)


@pytest.mark.skipif(not onednn.PACK_WEIGHTS, reason="oneDNN weight prepacking is an x86 CPU path")
def test_fp32_weights_are_packed_only_for_large_products() -> None:
    """Blocking every fp32 weight would double the model's weight memory: small products use the weight as
    it is, and the blocked copy gives the same numbers as the plain weight."""
    torch.manual_seed(0)
    layer = Linear(64, 96)
    small = torch.randn(onednn.FP32_PACK_ROWS - 1, 64)
    with torch.inference_mode():
        plain = linear(small, layer.weight, layer.bias)
        assert not hasattr(layer.weight, "_onednn_fp32")
        large = linear(torch.cat([small, small[:1]]), layer.weight, layer.bias)
        assert hasattr(layer.weight, "_onednn_fp32")
    torch.testing.assert_close(large[:-1], plain, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not onednn.PACK_WEIGHTS, reason="oneDNN weight prepacking is an x86 CPU path")
def test_moving_the_model_drops_its_packed_weights() -> None:
    from lgformer import config as config_mod
    from lgformer.model.build import build_model

    torch.manual_seed(0)
    model = build_model(config_mod.load("lite").model, pretrained=False).eval()
    ids = torch.tensor([[101, 1996, 2158, 102]])
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(1, 3, 64, 64), torch.ones_like(ids), ids=ids)
        model(torch.randn(1, 3, 128, 128), torch.ones_like(ids), ids=ids)  # 1/4 map: 1024 rows
    if onednn.ONEDNN_BF16:  # elsewhere bf16 autocast products stay on F.linear: nothing to pack
        assert sum(hasattr(p, "_onednn_bf16") for p in model.parameters()) > 10
    assert any(hasattr(p, "_onednn_fp32") for p in model.parameters())
    model.to(torch.float32)
    assert not any(hasattr(p, "_onednn_bf16") or hasattr(p, "_onednn_fp32") for p in model.parameters())


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_model_made_under_inference_mode_runs_and_follows_in_place_updates(preset: str) -> None:
    """Parameters made under `torch.inference_mode` have no version counter: the kept copies (packed weights,
    attention masks, Winograd and folded kernels) are not kept for them, so the model runs, gives the
    results of a model made outside it, and sees in-place weight updates made inside inference mode."""
    from lgformer import config as config_mod
    from lgformer.model.build import build_model

    torch.manual_seed(0)
    cfg = config_mod.load(preset).model
    reference = build_model(cfg, pretrained=False).eval()
    ids = torch.tensor([[101, 1996, 2158, 102]])
    image = torch.randn(1, 3, 128, 128)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model = build_model(cfg, pretrained=False).eval()
        model.load_state_dict(reference.state_dict())
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                torch.testing.assert_close(model(image, mask, ids=ids), reference(image, mask, ids=ids))
        model.load_state_dict(build_model(cfg, pretrained=False).state_dict())  # in place, new values
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(image, mask, ids=ids), reference(image, mask, ids=ids))


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_non_cpu_paths_run_on_the_meta_device_without_host_syncs(
    preset: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paths a GPU takes (fused window attention, the generic cross-attention, `F.linear`, the deformable
    sampling's autograd function), text encoder included, run on the meta device: inference and a training
    step at batch 2 with padded words. Meta tensors refuse `.item()` and mixing with CPU tensors, so this
    fails on a host sync (issue 6) or a tensor made on the CPU inside the forward, which CI (no GPU) could
    not see otherwise. Autocast has no meta backend: its `enabled=False` regions are no-ops there."""
    from lgformer import config as config_mod
    from lgformer.model.build import build_model
    from lgformer.model.loss import mask_loss

    autocast, enabled = torch.autocast, torch.is_autocast_enabled
    monkeypatch.setattr(
        torch,
        "autocast",
        lambda kind, *a, **k: contextlib.nullcontext() if kind == "meta" else autocast(kind, *a, **k),
    )
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: a != ("meta",) and enabled(*a))
    m = config_mod.load(preset).model
    model = build_model(m, pretrained=False).to("meta")
    image = torch.empty(2, 3, 128, 128, device="meta")
    ids = torch.tensor([[101, 1996, 2158, 102, 0, 0], [101, 1996, 2158, 2006, 2187, 102]], device="meta")
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], device="meta")
    with torch.no_grad():
        assert model.eval()(image, mask, ids=ids, all_outputs=False).shape == (2, 1, 128, 128)
    logits = model.train()(image, mask, ids=ids, upsample=False)
    loss = mask_loss(
        logits, torch.empty(2, 128, 128, device="meta"), m.loss_pos_weight, True, m.loss_resolution
    )
    loss.backward()
    assert all(
        p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad
    )


def test_linear_module_keeps_nn_linear_state_dict() -> None:
    assert Linear(4, 3).state_dict().keys() == nn.Linear(4, 3).state_dict().keys()
    assert isinstance(Linear(4, 3), nn.Linear)


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv1x1_matches_conv2d(channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = Conv1x1(8, 5)
    x = torch.randn(2, 8, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)


def test_winograd_tile_transforms_give_the_correlation_exactly() -> None:
    """Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the valid 4x4 cross-correlation of a 6x6 tile and a 3x3 kernel, float64."""
    torch.manual_seed(0)
    matrices = (winograd.WINOGRAD_BT, winograd.WINOGRAD_G, winograd.WINOGRAD_AT)
    bt, g_t, at = (torch.tensor(m, dtype=torch.float64) for m in matrices)
    d, g = torch.randn(6, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    y = at @ ((g_t @ g @ g_t.T) * (bt @ d @ bt.T)) @ at.T
    torch.testing.assert_close(y, F.conv2d(d[None, None], g[None, None])[0, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 8, 8, 8, 12), (2, 16, 12, 9, 13), (1, 4, 6, 1, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_matches_conv2d(shape: tuple[int, ...], channels_last: bool) -> None:
    """Winograd in fp32 inference (maps that fill their 4x4 tiles or not), conv2d with gradients; the cached
    transformed kernel follows in-place weight updates. The pixel decoder takes it from 256 channels."""
    torch.manual_seed(0)
    b, c, k, h, w = shape
    conv = Conv3x3(c, k)
    assert conv.state_dict().keys() == {"weight"}
    conv.winograd = True  # the small channel counts that keep a test fast do not take it by themselves
    x = torch.randn(b, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.inference_mode():
            y = conv(x)
        ref = F.conv2d(x.double(), conv.weight.double(), padding=1)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-5)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last) == onednn.ONEDNN
        assert (conv._winograd is not None) == onednn.ONEDNN
        with torch.no_grad():
            conv.weight.mul_(-2)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, padding=1))
    assert Conv3x3(256, 256).winograd and not Conv3x3(128, 128).winograd


@pytest.mark.parametrize("kv_dim", [12, 16])
@pytest.mark.parametrize(
    "lq, lk",
    [(9, 5), (9, 3), (1, 40), (2, 40)],
    ids=["projected", "folded-few-keys", "folded-one-query", "folded-two-queries"],
)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_multi_head_attention_matches_module(kv_dim: int, lq: int, lk: int, grad: bool, bias: bool) -> None:
    """The three attention forms (keys projected; key and value projections folded into the few queries;
    query and output projections folded into the few keys, in inference) equal `nn.MultiheadAttention`,
    with padded keys, in inference and in their gradients."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, kdim=kv_dim, vdim=kv_dim, batch_first=True)
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
    query, key, value = torch.randn(2, lq, 16), torch.randn(2, lk, kv_dim), torch.randn(2, lk, kv_dim)
    padding = torch.zeros(2, lk, dtype=torch.bool)
    padding[1, lk // 2 + 1 :] = True
    inputs = [t.requires_grad_(grad) for t in (query, key, value)]
    results = []
    for fn in (
        lambda: mha(*inputs, key_padding_mask=padding, need_weights=False)[0],
        lambda: multi_head_attention(mha, *inputs, padding),
    ):
        mha.zero_grad()
        for t in inputs:
            t.grad = None
        with torch.set_grad_enabled(grad):
            out = fn()
        grads = []
        if grad:
            out.square().sum().backward()
            grads = [t.grad for t in inputs] + [p.grad for p in mha.parameters()]
        results.append([out, *grads])
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_folded_few_keys_in_both_score_layouts(batch: int) -> None:
    """The query-major layout (fp32 on oneDNN) and the key-major one (bf16) of the few-keys fold both give
    `nn.MultiheadAttention`'s output, within bf16 rounding for the latter."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    query, key = torch.randn(batch, 300, 32), torch.randn(batch, 6, 24)
    padding = torch.zeros(batch, 6, dtype=torch.bool)
    padding[-1, 4:] = True
    with torch.inference_mode():
        ref = mha(query, key, key, key_padding_mask=padding, need_weights=False)[0]
        torch.testing.assert_close(
            multi_head_attention(mha, query, key, key, padding), ref, rtol=1e-5, atol=1e-5
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = multi_head_attention(mha, query, key, key, padding)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("heads", [1, 2])
def test_attend_normalised_folds_the_instance_norm(heads: int) -> None:
    """VLBA's language branch without the per-token product equals P · IN_N(layer(x)), values and gradients:
    exactly in float64, and in float32 within 1e-4 of the float64 result, on tokens whose mean is 30x their
    spread (the centring must come before the covariance)."""
    g = torch.Generator().manual_seed(0)
    n = 300
    assert 4 * 8 * (n + 96) < n * 96  # the folded form is taken
    layer = nn.Linear(8, 96).double()
    x0 = (torch.randn(2, n, 8, generator=g) * 0.1 + 3).double()
    p0 = torch.randn(2, heads, 5, n, generator=g).double().softmax(-1)

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:
        layer.to(dtype).zero_grad()
        x, p = (t.detach().to(dtype).requires_grad_() for t in (x0, p0))
        out = fn(p, x)
        out.square().sum().backward()
        return [t.double() for t in (out, x.grad, p.grad, layer.weight.grad)]

    def unfolded(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with fast.disabled("vlba-fold"):
            return attend_normalised(p, x, layer)

    def folded(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return attend_normalised(p, x, layer)

    expected = run(unfolded, torch.float64)
    torch.testing.assert_close(run(folded, torch.float64), expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(run(folded, torch.float32), expected):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("shift", [0, 3])
def test_bf16_training_window_attention_is_the_fused_kernels_up_to_bf16_rounding(shift: int) -> None:
    """In CPU bf16 training the window attention runs its products in bf16 (the fused kernel would upcast
    them to fp32 math for the trained bias): output and gradients stay as near the fp32 computation as the
    fused kernel's under autocast, and differ from it (the path is taken)."""
    from lgformer.model.swin import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(64, 2, 7)
    nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    x = torch.randn(2, 14, 21, 64)
    grad = torch.randn(2, 14, 21, 64)

    def run(amp: bool, *off: str) -> list[torch.Tensor]:
        inputs = [x.clone().requires_grad_(), *attn.parameters()]
        with fast.disabled(*off) if off else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = attn(inputs[0], shift)
        return [out.float().detach(), *torch.autograd.grad(out.float(), inputs, grad)]

    exact, fused, explicit = run(False), run(True, "window-explicit"), run(True)
    assert not torch.equal(explicit[0], fused[0])
    for e, f, q in zip(exact, fused, explicit):
        error, fused_error = (q - e).norm() / e.norm(), (f - e).norm() / e.norm()
        assert 0 < error < max(2 * fused_error, 1e-3) and error < 0.02


@pytest.mark.parametrize("padded", [False, True])
def test_bf16_training_attention_over_few_keys_is_the_fused_kernels_up_to_bf16_rounding(padded: bool) -> None:
    """In CPU bf16 training, cross-attention over few keys is written out: output and gradients stay as near
    the fp32 computation as the fused kernel's under autocast, padded keys get no weight, and it differs
    from the fused kernel's (the path is taken)."""
    from lgformer.model.attention import multi_head_attention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, batch_first=True)
    query, words = torch.randn(2, 50, 32), torch.randn(2, 7, 24)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = padded
    grad = torch.randn(2, 50, 32)

    def run(amp: bool, *off: str) -> list[torch.Tensor]:
        inputs = [query.clone().requires_grad_(), words.clone().requires_grad_(), *mha.parameters()]
        with fast.disabled(*off) if off else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = multi_head_attention(mha, inputs[0], inputs[1], inputs[1], padding).float()
        return [out.detach(), *torch.autograd.grad(out, inputs, grad)]

    exact, fused, explicit = run(False), run(True, "xattn-explicit"), run(True)
    assert not torch.equal(explicit[0], fused[0])
    if padded:  # no weight on padded words, so no gradient either
        assert not explicit[2][1, 4:].any()
    for e, f, q in zip(exact, fused, explicit):
        error, fused_error = (q - e).norm() / e.norm(), (f - e).norm() / e.norm()
        assert 0 < error < max(2 * fused_error, 1e-3) and error < 0.02


def test_deformable_sampling_backward_matches_embedding_bag_autograd() -> None:
    """The bag sampler's own backward (grid_sampler-based) equals autograd through its embedding_bag forward
    (the `bag-backward` path off), and both sample as the plain `grid_sample` form does (float64)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5, 7), (9, 11)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(2, S, 3, 4, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 10, 3, 3, 2, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(2, 10, 3, 3, 2, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 10, 12, generator=g, dtype=torch.float64)
    results = []
    for off in ((), ("bag-backward",), ("bag-sampler",)):
        inputs = [t.clone().requires_grad_() for t in (value, loc, weights)]
        with fast.disabled(*off) if off else contextlib.nullcontext():
            out = ms_deform_attn_sample(inputs[0], shapes, inputs[1], inputs[2])
        results.append((out.detach(), *torch.autograd.grad(out, inputs, grad)))
    for got, expected in zip(results[0], results[1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(results[0][0], results[2][0], rtol=0, atol=1e-10)


def test_bench_json_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--preset", "lite", "--size", "64", "--repeat", "1", "--train", "--json"]
    assert main([*argv, "--set", "model.decoder_fp32=false"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decoder_fp32"] is False and report["encoder_fp32_stages"] == 4  # the lite preset
    assert report["size"] == 64
    for field in (
        "latency",
        "images_per_s",
        "parts",
        "gflop",
        "gflop_by_dtype",
        "gemm_gflops",
        "gemm_gflops_by_dtype",
        "roofline_s",
        "efficiency",
        "peak_memory_mb",
        "train",
        "device",
        "threads",
    ):
        assert field in report, field
    assert set(report["parts"]) == {"text_encoder", "backbone", "pixel_decoder", "prototype_generator"}
    assert report["gflop"] > 0 and report["gemm_gflops"] > 0 and report["train"]["median_s"] > 0
    assert report["latency"]["min_s"] <= report["latency"]["median_s"] <= report["latency"]["max_s"]
    assert report["gflop"] == pytest.approx(sum(report["gflop_by_dtype"].values()))
    assert set(report["gflop_by_dtype"]) <= set(report["gemm_gflops_by_dtype"])
    roofline = sum(g / report["gemm_gflops_by_dtype"][d] for d, g in report["gflop_by_dtype"].items())
    assert report["roofline_s"] == pytest.approx(roofline)
    assert report["efficiency"] == pytest.approx(roofline / report["latency"]["median_s"])


def test_bench_training_step_scales_fp16_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lgformer bench --train --dtype fp16` steps as the authors' AMP does: the loss is scaled by a
    GradScaler, which unscales before clipping, and the update is made."""
    from lgformer import config as config_mod
    from lgformer.engine.bench import make_inputs, train_step
    from lgformer.model.build import build_model

    calls = []
    for name in ("scale", "unscale_"):
        method = getattr(torch.amp.GradScaler, name)
        monkeypatch.setattr(
            torch.amp.GradScaler, name, lambda self, *a, _m=method, _n=name: calls.append(_n) or _m(self, *a)
        )
    cfg = config_mod.load("lite", ["model.decoder_layers=1", "model.generator_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model, cfg, make_inputs(cfg, 32, 1, torch.device("cpu")), torch.float16, torch.device("cpu"))()
    assert calls == ["scale", "unscale_"]  # the lite recipe clips its gradients
    params = dict(model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trained.items())


def test_gemm_measurement_shrinks_for_slow_dtypes() -> None:
    """The rate-measuring product keeps n = 2048 at CPU fp32/bf16 rates and shrinks where a product would
    take seconds (fp16 on CPUs without native fp16 arithmetic: ~3 GFLOP/s), down to the probe size."""
    from lgformer.engine.bench import GEMM_PROBE, GEMM_SIZE, gemm_size

    assert gemm_size(200.0) == GEMM_SIZE == 2048
    assert gemm_size(3.0) == 512
    assert gemm_size(1e-3) == GEMM_PROBE


def test_flop_count_by_dtype_covers_onednn_linear_and_cpu_attention() -> None:
    """The counter sees the products PyTorch's own counter misses on CPU, and files them by compute dtype."""
    from lgformer.engine.bench import count_gflop

    x, w = torch.randn(3, 5, 8), torch.randn(4, 8)
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 7, 4)
    attention = 4 * 2 * 6 * 7 * 4 / 1e9

    def work() -> None:
        linear(x, w, None, "relu")
        F.scaled_dot_product_attention(q, k, k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(x, w)

    counts = count_gflop(work)
    assert counts[torch.float32] == pytest.approx(2 * 15 * 8 * 4 / 1e9 + attention)
    assert counts[torch.bfloat16] == pytest.approx(2 * 15 * 8 * 4 / 1e9)


SPEED_ABLATION = load_benchmark("speed_ablation")


@pytest.mark.parametrize("path", list(fast.PATHS))
def test_every_fast_path_computes_what_its_plain_form_computes(path: str) -> None:
    """With one fast path switched off through the public switch the network computes the same logits (the
    EfficientNet paths on the lite preset, the others on Swin-T with MiniLM), and the switch is back on
    after the block."""
    from lgformer import config as config_mod
    from lgformer.model.build import build_model

    preset = "lite" if path in ("channels-last", "bn-fold") else "official-swin-t"
    cfg = config_mod.load(preset, ["model.text_encoder=minilm", "model.decoder_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    ids = torch.tensor([[101, 1996, 2158, 2006, 1996, 2187, 102]])
    image = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        quick = model(image, torch.ones_like(ids), ids=ids)
        with fast.disabled(path):
            assert not fast.enabled(path)
            plain = model(image, torch.ones_like(ids), ids=ids)
    assert fast.enabled(path)
    torch.testing.assert_close(plain, quick, atol=1e-4, rtol=1e-4)


def test_the_switch_turns_everything_off_restores_and_names_its_paths() -> None:
    with fast.disabled():
        assert not any(fast.enabled(p) for p in fast.PATHS)
        with fast.disabled("winograd"):
            pass
        assert not fast.enabled("onednn")  # the outer block still holds
    assert all(fast.enabled(p) for p in fast.PATHS)
    with pytest.raises(LGFormerError, match="unknown fast path 'turbo'"):
        with fast.disabled("turbo"):
            pass
    assert SPEED_ABLATION.FAST_PATHS == tuple(fast.PATHS)  # the benchmark's list (kept light for --help)


def test_speed_ablation_in_process_alternates_variants_and_restores_the_fast_paths(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    variants = ["all", "fused-act", "bert-onednn", "channels-last"]
    args = argparse.Namespace(
        preset="lite",
        overrides=[],
        size=64,
        batch=1,
        dtype="fp32",
        threads=1,
        train=False,
        variants=variants,
        rounds=1,
        repeat=2,
    )
    times = SPEED_ABLATION.in_process(args)
    assert list(times) == variants and all(len(t) == 2 and min(t) > 0 for t in times.values())
    assert all(fast.enabled(p) for p in fast.PATHS)
    # the allocator is set when the process starts: refused in one process, one line
    monkeypatch.setattr("sys.argv", ["speed_ablation.py", "--in-process", "--variants", "all", "malloc"])
    with pytest.raises(SystemExit) as exit_info:
        SPEED_ABLATION.main()
    assert exit_info.value.code == 2
    assert "--in-process cannot switch malloc" in capsys.readouterr().err


def test_profile_by_module_charges_every_flop_to_a_module() -> None:
    """`profile_model.py --by-module`: the per-class GFLOP add up to the network's count (matmuls and
    convolutions included) and every module class that ran gets a row."""
    from lgformer import config as config_mod
    from lgformer.engine.bench import count_gflop
    from lgformer.model.build import build_model

    cfg = config_mod.load("official-swin-t", ["model.text_encoder=minilm", "model.decoder_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    ids = torch.tensor([[101, 1996, 2158, 2006, 1996, 2187, 102]])
    image = torch.randn(1, 3, 64, 64)

    def step() -> None:
        model(image, torch.ones_like(ids), ids=ids)

    table = load_benchmark("profile_model").by_module(model, step, torch.device("cpu"), 1)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    expected = sum(count_gflop(step).values())
    assert float(rows["total"][1]) == pytest.approx(expected, abs=0.01)
    assert {"WindowAttention", "MSDeformAttn", "VLBA", "Linear", "LayerNorm"} <= rows.keys()
    assert float(rows["WindowAttention"][2]) > 0  # its matmuls are counted


@pytest.mark.parametrize("input_grad", [True, False])
def test_flop_count_of_a_depthwise_convolution_backward_counts_its_groups(input_grad: bool) -> None:
    """A convolution's backward costs its forward once per gradient asked for, depthwise ones too (PyTorch's
    own formula counts them as dense: 48x too much here)."""
    from lgformer.engine.bench import FlopsByDtype

    conv = nn.Conv2d(48, 48, 5, padding=2, groups=48, bias=False)
    x = torch.randn(2, 48, 12, 12, requires_grad=input_grad)
    forward = 2 * 2 * 48 * 12 * 12 * 25
    with FlopsByDtype() as counter:
        conv(x).sum().backward()
    assert counter.flops[torch.float32] == forward * (3 if input_grad else 2)


def test_profile_phases_times_every_part_of_a_training_step() -> None:
    """`profile_model.py --train --phases`: every part of the step timed, the backward charged to module
    classes, and the step's products counted forward and backward (about three forwards)."""
    from lgformer import config as config_mod
    from lgformer.engine import bench
    from lgformer.engine.bench import count_gflop
    from lgformer.model.build import build_model

    profile_model = load_benchmark("profile_model")
    cfg = config_mod.load("official-swin-t", ["model.text_encoder=minilm", "model.decoder_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    x = bench.make_inputs(cfg, 64, 1, torch.device("cpu"))
    outputs = dict(upsample=False, all_outputs=cfg.model.loss_all_outputs)
    forward = sum(count_gflop(lambda: model(x["image"], x["mask"], ids=x["ids"], **outputs)).values())
    report = profile_model.phases(model, cfg, x, None, torch.device("cpu"), 1, None, 1)
    assert list(report["parts_ms"]) == [
        "forward + loss",
        "backward",
        "clip gradients",
        "AdamW step",
        "zero gradients",
    ]
    assert report["parts_ms"]["backward"] > 0 and report["step_ms"] >= sum(report["parts_ms"].values()) - 0.5
    assert {"MSDeformAttn", "VLBA", "WindowAttention"} <= report["backward_by_module_ms"].keys()
    # about three forwards (an inference forward takes some folded, cheaper forms: a little over three)
    assert 2.5 * forward < report["gflop"]["float32"] < 3.5 * forward
    assert report["roofline_ms"] > 0
    assert "backward, exclusive, by module class" in profile_model.format_phases(report)


def test_speed_ablation_checks_out_a_revision_and_removes_it() -> None:
    """`speed_ablation.py --against REV` times another revision's package from a temporary worktree."""
    with SPEED_ABLATION.worktrees(["HEAD"]) as trees:
        folder = trees["HEAD"]
        assert (folder / "src" / "lgformer" / "model" / "lgformer.py").is_file()
    assert not folder.exists()


def test_bf16_on_a_cpu_without_bf16_units_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    from lgformer import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(precision.PrecisionWarning, match="without bf16 units"):
        assert precision.autocast_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.autocast_dtype("bf16", cpu) == torch.bfloat16
        assert precision.autocast_dtype("fp32", cpu) is None


def test_the_bf16_probe_agrees_with_the_kernels_cpu_flags() -> None:
    from pathlib import Path

    from lgformer.precision import cpu_has_bf16_units

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert cpu_has_bf16_units() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & set(flags))


def test_speed_ablation_names_a_revision_git_cannot_check_out() -> None:
    with pytest.raises(SystemExit, match="--against no-such-rev: .*no-such-rev"):
        with SPEED_ABLATION.worktrees(["no-such-rev"]):
            pass


def test_hugepage_heap_environment_adds_glibcs_tunable_only_where_it_changes_something() -> None:
    """The `lgformer` command restarts itself with glibc.malloc.hugetlb=1 where the kernel gives 2 MB pages
    only on request (THP `madvise`); it keeps other tunables and a choice already made, and leaves the
    allocator alone under LGFORMER_MALLOC_TUNING=0."""
    from lgformer.precision import hugepage_heap_environment

    env = {"HOME": "/root"}
    added = hugepage_heap_environment(env, "madvise")
    if added is None:  # only without glibc 2.35 or later
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        assert name != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35)
        return
    assert added == {"HOME": "/root", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert env == {"HOME": "/root"}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hugepage_heap_environment(other, "madvise") == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    }
    assert hugepage_heap_environment(env, "always") is None  # every large mapping gets 2 MB pages already
    assert hugepage_heap_environment(env, "never") is None
    assert hugepage_heap_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") is None
    assert hugepage_heap_environment({"LGFORMER_MALLOC_TUNING": "0"}, "madvise") is None


def test_reexec_with_hugepage_heap_restarts_the_program_once_with_the_tunable() -> None:
    """A program that calls `reexec_with_hugepage_heap` first runs again, same arguments, with the
    environment `hugepage_heap_environment` gives on this machine (unchanged where it gives None)."""
    from lgformer.precision import hugepage_heap_environment

    code = (
        "import os, sys\n"
        "print('start', flush=True)\n"
        "from lgformer.precision import allocator_name, reexec_with_hugepage_heap, tune_cpu_allocator\n"
        "reexec_with_hugepage_heap()\n"
        "tune_cpu_allocator()\n"
        "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], allocator_name(), sep='|')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", code, "an-argument"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    expected = hugepage_heap_environment(env)
    tunables, argv, allocator = out[-1].split("|")
    assert argv == "['an-argument']"
    if expected is None:
        assert out[0] == "start" and len(out) == 2 and tunables == ""
    else:  # printed 'start' before and after the restart, then ran on once
        assert out[:2] == ["start", "start"] and len(out) == 3
        assert tunables == expected["GLIBC_TUNABLES"] and allocator == "tuned glibc heap, 2 MB pages"


def test_speed_ablation_sets_the_allocator_of_each_variants_process() -> None:
    """`plain` (the authors' stand-in) and `malloc` leave glibc's allocator as it is, `hugepages` keeps the
    tuned heap in 4 KB pages; no variant's process restarts itself with 2 MB pages against that."""
    from lgformer.precision import hugepage_heap_environment

    for variant in ("plain", "malloc"):
        env = SPEED_ABLATION.child_environment(variant)
        assert env["LGFORMER_MALLOC_TUNING"] == "0" and hugepage_heap_environment(env, "madvise") is None
    env = SPEED_ABLATION.child_environment("hugepages")
    assert env["GLIBC_TUNABLES"].endswith("glibc.malloc.hugetlb=0")
    assert hugepage_heap_environment(env, "madvise") is None and "LGFORMER_MALLOC_TUNING" not in env
