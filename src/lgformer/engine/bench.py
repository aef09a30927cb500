"""`lgformer bench`: latency, throughput, FLOPs, efficiency and peak memory of a preset's network.

Random weights (timing does not depend on their values). The full forward is what inference runs: the
text encoder included, the prediction map only (not the deep-supervision maps), upsampled to the input size;
the text encoder, backbone, pixel decoder and prototype generator (+ head) are also timed one by one
on the intermediate tensors of a full forward. Every timed call enters autocast itself, as an evaluation
loop does; under CPU bf16 the parameters' bf16 copies are made once, in the warm-up calls, and kept
(`lgformer.model.layers`), as in any repeated inference. GFLOP are counted per compute dtype with PyTorch's
flop formulas (matmuls, convolutions, attention; deformable sampling and elementwise work not counted). The
roofline is the time those flops take at the best n x n GEMM rate measured in the same process at each
dtype and thread count, over `torch.mm` and the network's own `linear` (oneDNN on x86 CPUs, faster than
`torch.mm`'s MKL sgemm on AMD); efficiency is roofline / median latency, so a mixed policy (bf16 autocast
with the authors' fp32 pixel decoder) is held to each part's own rate. The ratio against `torch.mm` alone is
reported too. On CPU memory is the peak resident set (VmHWM, reset before each phase); on GPU
`torch.cuda.max_memory_allocated`. `--train` times one step of the preset's training recipe (forward at
1/4 scale, loss, backward, gradient clipping if configured, AdamW).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lgformer import config as config_mod
from lgformer.config import Config
from lgformer.precision import allocator_name, autocast, autocast_dtype, cpu_info, precision_name

GEMM_SIZE = 2048  # n of the n x n x n product that measures a dtype's GEMM rate on a CPU
GEMM_SIZE_CUDA = 8192  # on a GPU, where 2048 is too small to reach the peak
GEMM_PROBE = 256  # the smallest n, also the probe that sizes the measurement (`gemm_size`)
GEMM_BUDGET_S = 0.5  # the longest one measuring product may take
VALID_TOKENS = 12  # [CLS] + 10 wordpieces + [SEP], a typical RefCOCO expression
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def cpu_name() -> str:
    """'AMD EPYC (family 26, model 2, 2 CPUs)' from /proc/cpuinfo, else the platform's processor string."""
    fields = cpu_info()
    name = fields.get("model name") or platform.processor() or "cpu"
    family = (
        f"family {fields['cpu family']}, model {fields.get('model', '?')}, " if "cpu family" in fields else ""
    )
    return f"{name} ({family}{os.cpu_count()} CPUs)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeat: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of `fn`, `repeat` times after `warmup` untimed calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def summarise(times: list[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def gemm_size(probe_gflops: float, n: int = GEMM_SIZE) -> int:
    """The n of the rate-measuring product: `n` halved (down to GEMM_PROBE) while one product would take over
    GEMM_BUDGET_S at the probe's rate: fp16 on a CPU without native fp16 arithmetic is emulated, and a
    full-size product would take seconds."""
    while n > GEMM_PROBE and 2 * n**3 / (probe_gflops * 1e9) > GEMM_BUDGET_S:
        n //= 2
    return n


def gemm_gflops(dtype: torch.dtype, device: torch.device, repeat: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n x n product at `dtype` (n from `gemm_size`): `torch.mm`, the network's `linear`
    (oneDNN for fp32 on x86 CPUs, see `lgformer.model.layers`) and the best of the two."""
    from lgformer.model.layers import linear

    def rates(n: int, repeat: int, warmup: int) -> dict[str, float]:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        with torch.inference_mode():
            return {
                name: 2 * n**3 / min(time_calls(partial(fn, a, b), repeat, warmup, device)) / 1e9
                for name, fn in (("torch_mm", torch.mm), ("linear", linear))
            }

    start = GEMM_SIZE_CUDA if device.type == "cuda" else GEMM_SIZE
    result = rates(gemm_size(min(rates(GEMM_PROBE, 1, 1).values()), start), repeat, 2)
    return {**result, "best": max(result.values())}


class FlopsByDtype(TorchDispatchMode):
    """Counts the flops of matmuls, convolutions and attention by compute dtype (the output's), with
    PyTorch's flop formulas plus the two CPU kernels its counter does not know: oneDNN's linear
    (`lgformer.model.layers`) and the CPU flash attention that SDPA runs (window and word attention)."""

    def __init__(self) -> None:
        from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_flop_count

        def linear_flop(x: torch.Tensor, w: torch.Tensor, *_: Any, **__: Any) -> int:
            return 2 * math.prod(x.shape[:-1]) * x.shape[-1] * w.shape[0]

        def cpu_flash_flop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> int:
            return sdpa_flop_count(q.shape, k.shape, v.shape)

        def conv_backward_flop(
            grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, *args: Any, **__: Any
        ) -> int:
            # the forward's count once per gradient asked for (PyTorch's formula ignores groups: it counts a
            # depthwise convolution's backward as a dense one)
            transposed, mask = args[4], args[7]
            forward = conv_flop_count(x.shape, w.shape, grad.shape, transposed)
            return forward * (int(mask[0]) + int(mask[1]))

        super().__init__()
        self.flops: dict[torch.dtype, int] = collections.defaultdict(int)
        self.formulas: dict[Any, Callable[..., int]] = {
            **flop_registry,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_flop,
            torch.ops.aten.convolution_backward: conv_backward_flop,
        }
        if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            self.formulas[torch.ops.mkldnn._linear_pointwise] = linear_flop

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            # a backward returns None for the gradients it was not asked for
            first = next((o for o in out if o is not None), None) if isinstance(out, (tuple, list)) else out
            if first is not None:
                self.count(first.dtype, formula(*args, **kwargs, out_val=out))
        return out

    def count(self, dtype: torch.dtype, flops: int) -> None:
        """Record one operator's flops (subclasses attribute them further, e.g. per module)."""
        self.flops[dtype] += flops


def count_gflop(fn: Callable[[], Any]) -> dict[torch.dtype, float]:
    """GFLOP of one call of `fn` (without autograd) by compute dtype (see `FlopsByDtype`)."""
    with torch.no_grad(), FlopsByDtype() as counter:
        fn()
    return {dtype: flops / 1e9 for dtype, flops in counter.flops.items()}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator statistics, or the kernel's resident high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or peak resident set size of this process, in MB since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(cfg: Config, size: int, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random normalised image batch and [CLS] w1..w10 [SEP] + padding token ids with their mask."""
    g = torch.Generator().manual_seed(0)
    t = cfg.model.max_tokens
    valid = min(VALID_TOKENS, t)
    ids = torch.zeros(batch, t, dtype=torch.long)
    ids[:, 0], ids[:, valid - 1] = 101, 102
    ids[:, 1 : valid - 1] = torch.randint(1000, 30000, (batch, valid - 2), generator=g)
    mask = (ids != 0).long()
    image = torch.randn(batch, 3, size, size, generator=g)
    target = (torch.rand(batch, size, size, generator=g) > 0.7).float()
    return {k: v.to(device) for k, v in dict(image=image, ids=ids, mask=mask, target=target).items()}


def _parts(
    model: nn.Module, x: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None
) -> dict[str, Callable[[], Any]]:
    """Closures running each box (under its own autocast) on the intermediates of one full forward."""
    image, ids, mask = x["image"], x["ids"], x["mask"]
    with autocast(device, dtype):
        words = model.text_encoder(ids, mask)
        feats, text_dec = model.image_encoder(image, words, mask)
        mask_features, ms_feats = model.pixel_decoder(feats, text_dec, mask)
    boxes = {
        "text_encoder": lambda: model.text_encoder(ids, mask),
        "backbone": lambda: model.image_encoder(image, words, mask),
        "pixel_decoder": lambda: model.pixel_decoder(feats, text_dec, mask),
        "prototype_generator": lambda: model.head(
            model.prototype_generator(text_dec, mask, ms_feats)[-1:], mask_features
        ),
    }

    def under_autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with autocast(device, dtype):
                return fn()

        return call

    return {name: under_autocast(fn) for name, fn in boxes.items()}


def train_step(
    model: nn.Module, cfg: Config, x: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device
) -> Callable[[], None]:
    """One optimiser step of the training recipe (the trainer's own functions): forward at 1/4 scale, loss,
    backward (scaled under fp16, as the authors' AMP), clip, AdamW."""
    from lgformer.engine.train import (
        backward_batches,
        build_optimizer,
        freeze,
        lent,
        optimizer_update,
        set_train_mode,
    )

    tc, m = cfg.train, cfg.model
    freeze(model, tc)
    set_train_mode(model, tc)
    optimizer = build_optimizer(model, tc, dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    batch = {"image": x["image"], "text_mask": x["mask"], "ids": x["ids"], "mask": x["target"]}

    def step() -> None:
        with lent(optimizer):
            backward_batches(model, iter([batch]), 1, m, device, dtype, scaler)
            optimizer_update(model, optimizer, scaler, tc.clip_grad)

    return step


def run(
    preset: str = "lite",
    size: int | None = None,
    batch: int = 1,
    dtype: str = "fp32",
    threads: int | None = None,
    repeat: int = 10,
    train: bool = False,
    device: str = "auto",
    parts: bool = True,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Benchmark `preset` (with config `overrides`, e.g. model.decoder_fp32=false) and return the report as a
    dict (see the module docstring)."""
    from lgformer.engine.distributed import setup
    from lgformer.model.build import build_model

    if threads:
        torch.set_num_threads(threads)
    _, dev = setup(device)
    amp = autocast_dtype(dtype)
    sized = [f"data.image_size={size}"] if size is not None else []
    cfg = config_mod.load(preset, [*overrides, *sized])  # `size` is checked as data.image_size
    size = cfg.data.image_size
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(dev).eval()
    x = make_inputs(cfg, size, batch, dev)

    def forward() -> torch.Tensor:
        # autocast per call, as an evaluation loop does: weight casts are part of the cost
        with autocast(dev, amp):
            return model(x["image"], x["mask"], ids=x["ids"], all_outputs=False)

    report: dict[str, Any] = {
        "preset": cfg.preset or preset,
        "size": size,
        "batch": batch,
        "dtype": precision_name(dtype),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "allocator": allocator_name() if dev.type == "cpu" else None,
        "repeat": repeat,
        "decoder_fp32": cfg.model.decoder_fp32,
        "encoder_fp32_stages": cfg.model.encoder_fp32_stages,
    }
    with torch.inference_mode():
        reset_peak_memory(dev)
        full = time_calls(forward, repeat, 2, dev)
        report["peak_memory_mb"] = round(peak_memory_mb(dev), 1)
        report["memory_kind"] = "cuda_max_allocated" if dev.type == "cuda" else "peak_rss"
        report["latency"] = summarise(full)
        report["images_per_s"] = batch / report["latency"]["median_s"]
        if parts:
            report["parts"] = {
                name: summarise(time_calls(fn, repeat, 1, dev))
                for name, fn in _parts(model, x, dev, amp).items()
            }
    # Efficiency against the roofline of the precision policy: each dtype's flops at that dtype's GEMM rate
    # (an fp32 pixel decoder under bf16 autocast is held to the fp32 rate).
    gflop = count_gflop(forward)
    own = amp or torch.float32
    gemm = {dtype: gemm_gflops(dtype, dev) for dtype in {own, *gflop}}
    median = report["latency"]["median_s"]
    roofline = {key: sum(g / gemm[d][key] for d, g in gflop.items()) for key in ("best", "torch_mm")}
    report["gflop"] = sum(gflop.values()) / batch
    report["gflop_by_dtype"] = {dtype_name(d): g / batch for d, g in gflop.items()}
    report["gemm_gflops"] = gemm[own]["best"]
    report["gemm_gflops_by_dtype"] = {dtype_name(d): r["best"] for d, r in gemm.items()}
    report["gemm_gflops_torch_mm"] = {dtype_name(d): r["torch_mm"] for d, r in gemm.items()}
    report["achieved_gflops"] = sum(gflop.values()) / median
    report["roofline_s"] = roofline["best"] / batch
    report["efficiency"] = roofline["best"] / median
    report["efficiency_vs_torch_mm"] = roofline["torch_mm"] / median
    if train:
        step = train_step(model, cfg, x, amp, dev)
        reset_peak_memory(dev)
        times = time_calls(step, repeat, 2, dev)
        report["train"] = {
            **summarise(times),
            "images_per_s": batch / statistics.median(times),
            "peak_memory_mb": round(peak_memory_mb(dev), 1),
        }
    return report


def format_report(r: dict[str, Any]) -> str:
    """Human-readable summary of a `run` report."""

    def span(t: dict[str, float]) -> str:
        return f"{t['median_s'] * 1e3:9.1f} ms  ({t['min_s'] * 1e3:.1f} - {t['max_s'] * 1e3:.1f})"

    memory = "GPU max allocated" if r["memory_kind"] == "cuda_max_allocated" else "peak RSS"
    lines = [
        f"{r['preset']}  {r['size']}x{r['size']}  batch {r['batch']}  {r['dtype']}  {r['threads']} threads  "
        f"{r['device']}  torch {r['torch']}  ({r['repeat']} runs, median (min - max))",
        f"  full forward         {span(r['latency'])}   {r['images_per_s']:.2f} images/s",
    ]
    for name, t in r.get("parts", {}).items():
        lines.append(f"    {name:<18} {span(t)}")
    by_dtype = ", ".join(f"{d} {g:.1f}" for d, g in r["gflop_by_dtype"].items())
    rates = ", ".join(
        f"{d} {g:.1f} (torch.mm {r['gemm_gflops_torch_mm'][d]:.1f})"
        for d, g in r["gemm_gflops_by_dtype"].items()
    )
    lines += [
        f"  model                {r['gflop']:9.1f} GFLOP/image ({by_dtype})   "
        f"{r['achieved_gflops']:.1f} GFLOP/s achieved",
        f"  GEMM GFLOP/s         {rates}",
        f"  roofline             {r['roofline_s'] * 1e3:9.1f} ms/image   efficiency {r['efficiency']:.2f}   "
        f"(vs torch.mm: {r['efficiency_vs_torch_mm']:.2f})",
        f"  {memory:<20} {r['peak_memory_mb']:9.1f} MB",
    ]
    if r.get("allocator"):
        lines.append(f"  allocator            {r['allocator']}")
    if "train" in r:
        t = r["train"]
        lines.append(
            f"  train step           {span(t)}   {t['images_per_s']:.2f} images/s   "
            f"{memory} {t['peak_memory_mb']:.1f} MB"
        )
    return "\n".join(lines)
