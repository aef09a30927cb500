"""The C kernels of `model/fast/`, built on first use by `model/fast/native.py`: the deformable sampler's
(`native-sampler`, pinned to the plain `grid_sample` form, forward and every gradient), GroupNorm's and
LayerNorm's backwards (`native-groupnorm`, `native-layernorm`, pinned to PyTorch's and to float64), the
stride-2 depthwise convolutions (`native-dw`, pinned to the padded map's convolution) and AdamW on bf16
weights (`bf16-weights`, pinned to PyTorch's fused AdamW and to the plain bf16 training step); their build
cached, run on PyTorch's OpenMP threads or POSIX ones, and its absence survived."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lgformer.model import fast
from lgformer.model.deformable_attention import MSDeformAttn, grid_sample_attention, ms_deform_attn_sample
from lgformer.model.efficientnet import DepthwiseConv, same_pad
from lgformer.model.fast import native
from lgformer.model.fast.adamw import Bf16WeightsAdamW, adamw_kernel
from lgformer.model.fast.depthwise import StridedDepthwise, depthwise_kernel
from lgformer.model.fast.groupnorm import GroupNormFunction, groupnorm_kernel
from lgformer.model.fast.layernorm import LayerNormFunction, layernorm_kernel
from lgformer.model.fast.sampling import NativeSample, native_applies, sampling_kernels
from lgformer.model.layers import GroupNorm, LayerNorm

SHAPES = [(3, 4), (5, 7), (9, 11)]
LOADERS = (
    native.library,
    sampling_kernels,
    groupnorm_kernel,
    depthwise_kernel,
    layernorm_kernel,
    adamw_kernel,
)


@pytest.fixture
def build_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own, the built kernels forgotten before and after."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    for loader in LOADERS:
        loader.cache_clear()
    yield tmp_path
    for loader in LOADERS:
        loader.cache_clear()


@pytest.fixture
def kernels(build_in: Path) -> Path:
    """`build_in`, on a machine with a C compiler to build the kernels with."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        pytest.skip(
            f"no C compiler ({compiler}) on PATH: the C kernels cannot be built, their PyTorch paths run"
        )
    return build_in


def inputs(dh: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """value, locations (some off the map, on its border and far outside), weights and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(2, S, 3, dh, generator=g)
    loc = torch.rand(2, 10, 3, 3, 2, 2, generator=g) * 1.6 - 0.3
    loc[0, 0, 0, 0, 0] = torch.tensor([-0.5 / 4, 0.5])  # x̃ = −1: only the right neighbours read
    loc[0, 1, 1, 2, 1] = torch.tensor([1e30, -1e30])
    loc[1, 2, 2, 1, 0] = torch.tensor([0.999, 0.0])
    weights = torch.rand(2, 10, 3, 3, 2, generator=g)
    return value, loc, weights, torch.randn(2, 10, 3 * dh, generator=g)


def sample_and_grads(value, loc, weights, grad, *off: str) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (value, loc, weights)]
    with fast.disabled(*off) if off else contextlib.nullcontext():  # disabled() with no name: all paths off
        out = ms_deform_attn_sample(leaves[0], SHAPES, leaves[1], leaves[2])
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("dh", [16, 5])
def test_native_sampler_matches_plain_form(kernels: Path, monkeypatch: pytest.MonkeyPatch, dh: int) -> None:
    """Sample and value, location and weight gradients as near the float64 plain form as its float32 run is,
    and the kernel is what ran."""
    value, loc, weights, grad = inputs(dh)
    calls, apply = [], NativeSample.apply
    monkeypatch.setattr(NativeSample, "apply", lambda *args: calls.append(1) or apply(*args))
    assert native_applies(value, loc)
    kernel = sample_and_grads(value, loc, weights, grad)
    assert calls == [1]
    exact = sample_and_grads(
        *(t.double() for t in (value, loc, weights, grad)), "native-sampler", "bag-sampler"
    )
    plain = sample_and_grads(value, loc, weights, grad, "native-sampler", "bag-sampler")
    for got, fp32, ref in zip(kernel, plain, exact):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert relative_error(got, ref) < max(4 * relative_error(fp32, ref), 1e-6)
    # the point at x̃ = −1 and the ones far outside have their exact gradients (zero where nothing is read)
    assert kernel[2][0, 1, 1, 2, 1].eq(0).all() and kernel[3][0, 1, 1, 2, 1] == 0
    torch.testing.assert_close(
        kernel[2][0, 0, 0, 0, 0].double(), exact[2][0, 0, 0, 0, 0], rtol=1e-5, atol=1e-5
    )


def test_native_sampler_inference_bf16_and_nan(kernels: Path) -> None:
    """Without autograd the forward kernel alone; a bf16 value gets a bf16 sample and value gradient; a NaN
    location makes its query's sample NaN, as the plain form does."""
    value, loc, weights, grad = inputs(seed=1)
    with torch.no_grad():
        fast_out = ms_deform_attn_sample(value, SHAPES, loc, weights)
    torch.testing.assert_close(
        fast_out, grid_sample_attention(value, SHAPES, loc, weights), rtol=1e-5, atol=1e-5
    )
    low = sample_and_grads(value.bfloat16(), loc, weights, grad.bfloat16())
    plain = sample_and_grads(value.bfloat16(), loc, weights, grad.bfloat16(), "native-sampler", "bag-sampler")
    assert [t.dtype for t in low] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for got, ref in zip(low, plain):
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    loc[1, 3, 0, 1, 1, 0] = float("nan")
    out = ms_deform_attn_sample(value, SHAPES, loc, weights)
    assert out[1, 3, :16].isnan().all() and not out[1, 3, 16:].isnan().any() and not out[0].isnan().any()


def test_native_sampler_same_bits_on_any_thread_count(kernels: Path) -> None:
    """Each (batch, head) map is one thread's whole: the split over threads changes no bit."""
    value, loc, weights, grad = inputs(seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            results.append(sample_and_grads(value, loc, weights, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_native_build_is_cached(kernels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built once into the cache folder (no temporary file left), then loaded from it with no compiler run."""
    assert sampling_kernels() is not None
    assert [p.suffix for p in kernels.iterdir()] == [".so"]
    native.library.cache_clear()
    sampling_kernels.cache_clear()

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    assert sampling_kernels() is not None


@pytest.mark.parametrize("compiler", ["missing", "failing"])
def test_native_sampler_falls_back_without_a_compiler(
    build_in: Path, monkeypatch: pytest.MonkeyPatch, compiler: str
) -> None:
    """No compiler, or one that fails (Python given C flags): one warning saying why, and the embedding_bag
    sampler runs instead."""
    monkeypatch.setenv("CC", "no-such-cc" if compiler == "missing" else sys.executable)
    value, loc, weights, grad = inputs(seed=3)
    with pytest.warns(native.NativeWarning, match="no C compiler" if compiler == "missing" else "failed"):
        got = sample_and_grads(value, loc, weights, grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        assert not native_applies(value, loc)
    assert not list(build_in.iterdir())
    bag = sample_and_grads(value, loc, weights, grad, "native-sampler")
    assert all(torch.equal(a, b) for a, b in zip(got, bag))


@pytest.mark.parametrize("affine", [True, False])
def test_native_groupnorm_backward_matches_pytorch(
    kernels: Path, monkeypatch: pytest.MonkeyPatch, affine: bool
) -> None:
    """On a bf16 channels-last map in training: the forward is PyTorch's bit for bit; the input gradient is
    PyTorch's bf16 one within a rounding and as near the float64 one on the same bf16 operands (a 1% error in
    x̂'s term fails this), the weight and bias gradients within fp32 summation error of it."""
    calls, apply = [], GroupNormFunction.apply
    monkeypatch.setattr(GroupNormFunction, "apply", lambda *args: calls.append(1) or apply(*args))
    g = torch.Generator().manual_seed(4)
    norm = GroupNorm(8, 48, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
    x = torch.randn(3, 48, 13, 7, generator=g).mul_(3).add_(1).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(3, 48, 13, 7, generator=g) + 0.3 * x.detach().float()  # (x̂'s term counts too)
    grad = grad.bfloat16().contiguous(memory_format=torch.channels_last)
    params = list(norm.parameters())

    def run(*off: str) -> list[torch.Tensor]:
        with fast.disabled(*off) if off else contextlib.nullcontext():
            y = norm(x)
        return [y, *torch.autograd.grad(y, [x, *params], grad)]

    kernel, plain = run(), run("native-groupnorm")
    assert calls == [1] and kernel[1].dtype == torch.bfloat16
    assert kernel[1].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(kernel[0], plain[0])
    wide = [x.detach().double().requires_grad_(), *(p.detach().double().requires_grad_() for p in params)]
    y = torch.nn.functional.group_norm(wide[0], 8, *(wide[1:] if affine else (None, None)), norm.eps)
    exact = torch.autograd.grad(y, wide, grad.double())
    scale = plain[1].abs().max().item()  # the same formulas: at most a rounding apart, element by element
    torch.testing.assert_close(kernel[1], plain[1], rtol=2**-7, atol=2**-7 * scale)
    assert relative_error(kernel[1], exact[0]) <= 1.05 * relative_error(plain[1], exact[0])
    for got, want in zip(kernel[2:], exact[1:]):
        assert got.dtype == torch.float32 and relative_error(got, want) < 1e-5


def test_native_groupnorm_only_where_it_pays(build_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 maps, NCHW maps and inference keep PyTorch's GroupNorm."""
    calls, apply = [], GroupNormFunction.apply
    monkeypatch.setattr(GroupNormFunction, "apply", lambda *args: calls.append(1) or apply(*args))
    norm = GroupNorm(4, 16)
    x = torch.randn(2, 16, 5, 5)
    norm(x.contiguous(memory_format=torch.channels_last).requires_grad_())
    norm(x.bfloat16().requires_grad_())
    with torch.no_grad():
        norm(x.bfloat16().contiguous(memory_format=torch.channels_last))
    assert calls == []


@pytest.mark.parametrize("ref_rows", [1, 2], ids=["shared-reference", "per-image-reference"])
def test_native_sampler_fused_in_the_module(
    kernels: Path, monkeypatch: pytest.MonkeyPatch, ref_rows: int
) -> None:
    """MSDeformAttn with the kernel making the locations from its raw offsets and reference points: the output
    and the gradients of query, value and every parameter as near the float64 module (plain form) as the
    float32 plain module is; reference points that need a gradient keep the given-locations form."""
    forms, apply = [], NativeSample.apply
    monkeypatch.setattr(
        NativeSample, "apply", lambda *args: forms.append(args[3] is not None) or apply(*args)
    )
    g = torch.Generator().manual_seed(5)
    module = MSDeformAttn(dim=24, levels=3, heads=3, points=2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    S = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, S, 24, generator=g), torch.randn(2, S, 24, generator=g)
    ref = torch.rand(ref_rows, S, 2, generator=g)
    grad = torch.randn(2, S, 24, generator=g)

    def run(dtype: torch.dtype, *off: str) -> list[torch.Tensor]:
        m = copy.deepcopy(module).to(dtype)
        leaves = [query.to(dtype).requires_grad_(), value.to(dtype).requires_grad_()]
        with fast.disabled(*off) if off else contextlib.nullcontext():
            out = m(leaves[0], ref.to(dtype), leaves[1], SHAPES)
        return [out.detach(), *torch.autograd.grad(out, [*leaves, *m.parameters()], grad.to(dtype))]

    kernel = run(torch.float32)
    assert forms == [True]
    plain = run(torch.float32, "native-sampler", "bag-sampler")
    exact = run(torch.float64, "native-sampler", "bag-sampler")
    for got, fp32, ref64 in zip(kernel, plain, exact):
        assert relative_error(got, ref64) < max(4 * relative_error(fp32, ref64), 1e-6)
    ref.requires_grad_()
    out = module(query, ref, value, SHAPES)
    assert forms == [True, False]
    torch.autograd.grad(out, ref, grad)


@pytest.mark.parametrize("kernel, size", [(3, (12, 9)), (5, (11, 14))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_depthwise_matches_padded_convolution(
    kernels: Path, monkeypatch: pytest.MonkeyPatch, kernel: int, size: tuple[int, int], dtype: torch.dtype
) -> None:
    """A stride-2 depthwise convolution with a bias (the folded BN's), fp32 and under bf16 autocast: output
    and the input, weight and bias gradients as near the float64 convolution of the padded map (on the
    operands the run rounds to) as the plain path is; odd and even sizes (the padding one-sided or not)."""
    calls, apply = [], StridedDepthwise.apply
    monkeypatch.setattr(StridedDepthwise, "apply", lambda *args: calls.append(1) or apply(*args))
    g = torch.Generator().manual_seed(6)
    conv = DepthwiseConv(24, kernel, 2)
    with torch.no_grad():
        conv.weight.normal_(generator=g)
    bias = torch.randn(24, generator=g).requires_grad_()
    x = torch.randn(3, 24, *size, generator=g).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 24, *(n // 2 + n % 2 for n in size), generator=g)
    autocast = dtype == torch.bfloat16

    def run(*off: str) -> list[torch.Tensor]:
        leaf = x.clone().requires_grad_()
        with fast.disabled(*off) if off else contextlib.nullcontext():
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                y = conv._conv_forward(leaf, conv.weight, bias)
        return [y, *torch.autograd.grad(y, [leaf, conv.weight, bias], grad.to(y.dtype))]

    got, plain = run(), run("native-dw")
    assert calls == [1] and got[0].dtype == dtype
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    wide = [t.detach().to(dtype).double().requires_grad_() for t in (x, conv.weight, bias)]
    y = F.conv2d(same_pad(wide[0], kernel), wide[1], wide[2], 2, 0, 1, 24)
    exact = [y, *torch.autograd.grad(y, wide, grad.to(dtype).double())]
    for fast_one, plain_one, want in zip(got, plain, exact):
        assert fast_one.shape == want.shape
        floor = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of the result
        assert relative_error(fast_one, want) < max(1.05 * relative_error(plain_one, want), floor)


def test_native_depthwise_only_where_it_applies(build_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stride 1, NCHW maps, float64 and tracing keep the padded convolution."""
    calls, apply = [], StridedDepthwise.apply
    monkeypatch.setattr(StridedDepthwise, "apply", lambda *args: calls.append(1) or apply(*args))
    x = torch.randn(2, 8, 6, 6)
    DepthwiseConv(8, 3, 1)(x.contiguous(memory_format=torch.channels_last))
    DepthwiseConv(8, 3, 2)(x)
    DepthwiseConv(8, 3, 2).double()(x.double().contiguous(memory_format=torch.channels_last))
    torch.jit.trace(
        DepthwiseConv(8, 3, 2), x.contiguous(memory_format=torch.channels_last), check_trace=False
    )
    assert calls == []


@pytest.mark.skipif(not native.gnu_openmp_loaded(), reason="PyTorch runs on no GNU OpenMP here")
def test_native_kernels_on_pytorchs_openmp_and_on_posix_threads(
    kernels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built with OpenMP, a kernel runs on PyTorch's own libgomp (no second OpenMP runtime loaded); built
    without, on POSIX threads, to the same bits (each job's work is the same)."""
    monkeypatch.setenv(native.OPENMP_ENV, "1")  # whatever the environment running the tests says
    value, loc, weights, grad = inputs(seed=7)
    with_openmp = sample_and_grads(value, loc, weights, grad)
    assert native.OPENMP in native.flag_sets()[0]
    runtimes = {
        line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line
    }
    assert len(runtimes) == 1
    for loader in LOADERS:
        loader.cache_clear()
    monkeypatch.setenv(native.OPENMP_ENV, "0")
    assert native.OPENMP not in native.flag_sets()[0]
    with_threads = sample_and_grads(value, loc, weights, grad)
    assert len(list(kernels.glob("sampling-*.so"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(with_openmp, with_threads))


@pytest.mark.parametrize("affine", [True, False])
def test_native_layernorm_backward_sums_in_fp32(
    kernels: Path, monkeypatch: pytest.MonkeyPatch, affine: bool
) -> None:
    """On a bf16 input in training (LayerNorm follows its input's dtype under autocast): the forward is
    PyTorch's bit for bit, the input gradient as near the float64 one on the same bf16 operands as PyTorch's
    bf16 one, the weight and bias gradients within fp32 summation error of it over 3,000 rows (PyTorch's
    sums them in bf16); rows of 40, not a multiple of a vector."""
    calls, apply = [], LayerNormFunction.apply
    monkeypatch.setattr(LayerNormFunction, "apply", lambda *args: calls.append(1) or apply(*args))
    g = torch.Generator().manual_seed(8)
    norm = LayerNorm(40, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
    x = (torch.randn(3, 1000, 40, generator=g) * 3 + 1).bfloat16().requires_grad_()
    grad = (torch.randn(3, 1000, 40, generator=g) + 0.3 * x.detach().float()).bfloat16()
    params = list(norm.parameters())

    def run(*off: str) -> list[torch.Tensor]:
        with fast.disabled(*off) if off else contextlib.nullcontext():
            y = norm(x)
        return [y, *torch.autograd.grad(y, [x, *params], grad)]

    kernel, plain = run(), run("native-layernorm")
    assert calls == [1] and kernel[1].dtype == torch.bfloat16
    assert torch.equal(kernel[0], plain[0])
    wide = [x.detach().double().requires_grad_(), *(p.detach().double().requires_grad_() for p in params)]
    y = F.layer_norm(wide[0], (40,), *(wide[1:] if affine else (None, None)), norm.eps)
    exact = torch.autograd.grad(y, wide, grad.double())
    assert relative_error(kernel[1], exact[0]) <= 1.05 * relative_error(plain[1], exact[0])
    for got, want in zip(kernel[2:], exact[1:]):
        assert got.dtype == torch.float32 and relative_error(got, want) < 1e-5
    if affine:  # an input that needs no gradient (its gradient not computed): the same weight gradients
        y = norm(x.detach())
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(y, params, grad), kernel[2:]))
        assert calls == [1, 1]


def test_native_layernorm_only_where_it_applies(build_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 inputs, inference and a LayerNorm over two axes keep PyTorch's."""
    calls, apply = [], LayerNormFunction.apply
    monkeypatch.setattr(LayerNormFunction, "apply", lambda *args: calls.append(1) or apply(*args))
    x = torch.randn(2, 5, 16)
    LayerNorm(16)(x.requires_grad_())
    with torch.no_grad():
        LayerNorm(16)(x.bfloat16())
    LayerNorm((5, 16))(x.bfloat16().requires_grad_())
    assert calls == []


def weights_and_groups(seed: int) -> tuple[list[torch.nn.Parameter], list[dict]]:
    """A linear weight and bias, a channels-last convolution weight and a long vector of an odd size (the
    kernel's split over threads and PyTorch's vector tail), in two groups as the trainer's."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 40), (48,), (16, 8, 3, 3), (100_003,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    params[2].data = params[2].data.to(memory_format=torch.channels_last)
    return params, [dict(params=params[:2], lr=1e-3, weight_decay=0.01), dict(params=params[2:], lr=3e-4)]


def test_adamw_on_bf16_weights_is_pytorchs_fused_adamw(kernels: Path) -> None:
    """Four steps from bf16 gradients, clipped: the fp32 masters and moments are PyTorch's fused AdamW's on
    the gradients cast to fp32 (clipped by `clip_grad_norm_`) bit for bit, but for PyTorch's own vector tail
    (a few elements of the odd-sized vector, within an ulp), and each bf16 copy is its master's cast."""
    ours, groups = weights_and_groups(0)
    theirs, their_groups = weights_and_groups(0)
    opt = Bf16WeightsAdamW(groups, weight_decay=0.05)
    ref = torch.optim.AdamW(their_groups, weight_decay=0.05, fused=True)
    opt._copies = {p: p.detach().to(torch.bfloat16) for p in ours}  # as a watched first step leaves them
    opt._versions = {p: p._version for p in ours}
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [(torch.randn(p.shape, generator=g) * 10**-step).bfloat16() for p in ours]
        with opt.lent():
            assert all(p.dtype == torch.bfloat16 for p in ours)
            for p, grad in zip(ours, grads):
                p.grad = grad.clone()  # the convolution's in NCHW order, unlike its weight: put in order
            total = opt.clip_grad_norm_(ours, 0.5)
            opt.step()
        for p, grad in zip(theirs, grads):
            p.grad = torch.empty_like(p).copy_(grad)
        assert total == torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
        for p, q in zip(ours, theirs):
            assert p.dtype == torch.float32 and p.stride() == q.stride()
            assert torch.equal(opt._copies[p], q.detach().to(torch.bfloat16))
            for a, b in [(p, q), *((opt.state[p][k], ref.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))]:
                differ = (a != b).sum().item()
                assert differ <= 8, (step, differ)
                torch.testing.assert_close(a, b, rtol=2e-7, atol=0)


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_bf16_weights_step_is_the_plain_bf16_step(kernels: Path, preset: str) -> None:
    """Three trainer steps under bf16 autocast with the products' weights kept in bf16 give the plain steps'
    weights bit for bit, also after an in-place change to a weight between steps (its copy is remade).
    The first step finds the weights: linear weights are taken, LayerNorm's and the deformable attention's
    fp32 sampling offsets are not; outside the step every parameter is fp32."""
    from lgformer import config as config_mod
    from lgformer.engine.bench import make_inputs
    from lgformer.engine.train import backward_batches, build_optimizer, freeze, lent, optimizer_update
    from lgformer.model.build import build_model

    overrides = ["model.text_encoder=minilm", "model.decoder_layers=1", "model.decoder_fp32=false"]
    cfg = config_mod.load(preset, [*overrides, "model.encoder_fp32_stages=0", "train.clip_grad=1.0"])
    torch.manual_seed(0)
    models = [build_model(cfg.model, pretrained=False).train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = make_inputs(cfg, 64, 2, torch.device("cpu"))
    batch = {"image": x["image"], "text_mask": x["mask"], "ids": x["ids"], "mask": x["target"]}
    optimizers = []
    for model, amp in zip(models, (torch.bfloat16, None)):  # the plain AdamW for the plain steps
        freeze(model, cfg.train)
        optimizers.append(build_optimizer(model, cfg.train, amp))
    for step in range(3):
        for model, opt in zip(models, optimizers):
            if step == 2:
                with torch.no_grad():
                    model.prototype_generator.layers[0].ffn[0].weight.mul_(0.5)
            torch.manual_seed(step)
            with lent(opt):
                backward_batches(model, iter([batch]), 1, cfg.model, torch.device("cpu"), torch.bfloat16)
                optimizer_update(model, opt, None, cfg.train.clip_grad)
            assert all(p.dtype == torch.float32 for p in model.parameters())
        for a, b in zip(*(m.parameters() for m in models)):
            assert torch.equal(a, b), step
    lent_names = {name for name, p in models[0].named_parameters() if p in optimizers[0]._copies}
    assert "prototype_generator.layers.0.ffn.0.weight" in lent_names
    assert not any("norm" in n or "sampling_offsets" in n for n in lent_names)
    linear = [f"{n}.weight" for n, m in models[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(lent_names & set(linear)) > len(linear) // 2


def test_bf16_weights_fall_back_to_adamw_without_a_compiler(
    build_in: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No compiler: one warning, the weights stay fp32 inside `lent()` and the step is PyTorch's AdamW."""
    monkeypatch.setenv("CC", "no-such-cc")
    ours, groups = weights_and_groups(2)
    theirs, their_groups = weights_and_groups(2)
    opt = Bf16WeightsAdamW(groups)
    ref = torch.optim.AdamW(their_groups, fused=True)

    def step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()

    for warned in (True, False):
        expected = pytest.warns(native.NativeWarning, match="no C compiler")
        with expected if warned else warnings.catch_warnings():
            warnings.simplefilter("default" if warned else "error")
            with opt.lent():
                assert all(p.dtype == torch.float32 for p in ours)
                step(ours, opt)
        step(theirs, ref)
    assert opt._copies is None and all(torch.equal(p, q) for p, q in zip(ours, theirs))
