"""Leave-one-out timing of the network's CPU fast paths (issue 6): what each one is worth today.

    python benchmarks/speed_ablation.py --preset official-swin-b --size 480 --dtype fp32
    python benchmarks/speed_ablation.py --preset lite --size 320 --batch 8 --train
    python benchmarks/speed_ablation.py --preset official-swin-b --dtype bf16 --in-process \
        --variants all prepack window-sdpa --set model.decoder_fp32=false

Every variant runs in its own process (fresh allocator state), with one fast path switched off:
  all            nothing switched off
  malloc         glibc keeps its default mmap/trim thresholds (LGFORMER_MALLOC_TUNING=0)
  onednn         fp32 products through F.linear / conv2d (MKL sgemm) instead of oneDNN
  bf16-onednn    bf16 autocast products through autocast's F.linear (activations unfused)
  prepack        oneDNN products cast and block their weights on every call (bf16; fp32 of >= 512 rows)
  fused-act      oneDNN products without the fused ReLU/GELU/tanh (applied separately)
  bert-onednn    the text encoder's products through F.linear (MKL sgemm), the GELU applied separately
  channels-last  the EfficientNet-Lite2 trunk runs NCHW
  msda-backward  deformable sampling differentiated through embedding_bag (sorting backward)
  window-sdpa    Swin window attention through the fused SDPA kernel in CPU inference too
  attn-fold      cross-attention projects every key and value even for one query (prototype generator)
  xattn-fold     cross-attention projects every query and output even for few keys (the pixel decoder's
                 pixels -> words), through the fused SDPA kernel
  vlba-fold      VLBA's language branch applies sym_value to every token, then the instance norm
  bn-fold        EfficientNet-Lite2's BatchNorms run after their convolutions in inference too
  winograd       the pixel decoder's 3x3 output convolution through conv2d in fp32 CPU inference too
Rounds alternate the variants; the table gives min and median seconds per forward (or training step).

--in-process builds one model and alternates the variants call by call inside one process instead, which
cancels the drift of shared cores (±5% between processes); `malloc` acts when the process starts, so it
needs separate processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from lgformer.arguments import add_overrides_argument
from lgformer.precision import autocast, autocast_dtype, precision_name, tune_cpu_allocator

VARIANTS = [
    "all",
    "malloc",
    "onednn",
    "bf16-onednn",
    "prepack",
    "fused-act",
    "bert-onednn",
    "channels-last",
    "msda-backward",
    "window-sdpa",
    "attn-fold",
    "xattn-fold",
    "vlba-fold",
    "bn-fold",
    "winograd",
]


BUILD_TIME = ("malloc",)  # acts when the process starts


def switchable() -> list[tuple[object, str]]:
    """The (owner, attribute) pairs that `switch_off` may replace."""
    from lgformer.model import deformable_attention, efficientnet, fusion, layers, swin, text_encoder

    return [
        (layers, "ONEDNN"),
        (layers, "PACK_WEIGHTS"),
        (layers, "_onednn_linear"),
        (layers, "_onednn_dtype"),
        (text_encoder, "linear"),
        (efficientnet.Stem, "forward"),
        (deformable_attention, "ms_deform_attn_sample"),
        (swin, "_explicit_attention"),
        (layers, "_folded_attention"),
        (layers, "_folded_query_attention"),
        (fusion, "attend_normalised"),
        (efficientnet, "conv_bn"),
        (layers.Conv3x3, "_conv_forward"),
    ]


def switch_off(variant: str) -> None:
    """Apply one variant's patch in this (child) process, before the model is built."""
    import torch
    import torch.nn.functional as F
    from torch import Tensor

    from lgformer.model import deformable_attention, efficientnet, fusion, layers, swin, text_encoder

    def _heads(t: Tensor, heads: int) -> Tensor:
        """(B, L, heads·d) -> (B, heads, L, d)."""
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    if variant == "onednn":
        layers.ONEDNN = False
    elif variant == "prepack":
        layers.PACK_WEIGHTS = False
    elif variant == "fused-act":
        fused = layers._onednn_linear

        def unfused(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str = "none") -> Tensor:
            y = fused(x, weight, bias)
            return y if activation == "none" else layers.ACTIVATIONS[activation](y)

        layers._onednn_linear = unfused
    elif variant == "bf16-onednn":
        onednn_dtype = layers._onednn_dtype

        def fp32_only(x: Tensor, weight: Tensor) -> torch.dtype | None:
            return None if torch.is_autocast_enabled("cpu") else onednn_dtype(x, weight)

        layers._onednn_dtype = fp32_only
    elif variant == "bert-onednn":

        def plain(
            x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
        ) -> Tensor:
            y = F.linear(x, weight, bias)
            return y if activation is None else layers.ACTIVATIONS[activation](y)

        text_encoder.linear = plain
    elif variant == "channels-last":

        def nchw_stem(self: efficientnet.Stem, x: Tensor) -> Tensor:
            return self.act(self.bn(self.conv(torch.addcmul(self.input_shift, x, self.input_scale))))

        efficientnet.Stem.forward = nchw_stem
    elif variant == "msda-backward":
        deformable_attention.ms_deform_attn_sample = deformable_attention._bag_sample
    elif variant == "window-sdpa":
        swin._explicit_attention = swin._fused_attention
    elif variant == "attn-fold":

        def projected_keys(
            q: Tensor,
            key: Tensor,
            value: Tensor,
            wk: Tensor,
            wv: Tensor,
            bv: Tensor | None,
            heads: int,
            mask: Tensor | None,
        ) -> Tensor:
            # the key bias is left out: it shifts all scores of a query alike
            k, v = _heads(layers.linear(key, wk), heads), _heads(layers.linear(value, wv, bv), heads)
            return F.scaled_dot_product_attention(_heads(q, heads), k, v, attn_mask=mask).transpose(1, 2)

        layers._folded_attention = projected_keys
    elif variant == "xattn-fold":
        layers._folded_query_attention = layers._projected_query_attention
    elif variant == "vlba-fold":
        fusion.attend_normalised = fusion.attend_projected
    elif variant == "bn-fold":
        efficientnet.conv_bn = lambda conv, bn, x: bn(conv(x))
    elif variant == "winograd":
        layers.Conv3x3._conv_forward = torch.nn.Conv2d._conv_forward
    elif variant not in ("all", "malloc"):
        raise SystemExit(f"unknown variant {variant}")


def _workload(args: argparse.Namespace) -> Callable[[], None]:
    """Build the preset's model (random weights) and return one forward (or training step) of it."""
    import torch

    from lgformer import config as config_mod
    from lgformer.engine import bench
    from lgformer.model.build import build_model

    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as every command does (LGFORMER_MALLOC_TUNING=0 leaves it off)
    cfg = config_mod.load(args.preset, args.overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    dev = torch.device("cpu")
    x = bench.make_inputs(cfg, args.size or cfg.data.image_size, args.batch, dev)
    amp = autocast_dtype(args.dtype)
    if args.train:
        return bench.train_step(model, cfg, x, amp, dev)

    def fn() -> None:
        with torch.inference_mode(), autocast(dev, amp):
            model(x["image"], x["mask"], ids=x["ids"])

    return fn


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    switch_off(args.variant)
    fn = _workload(args)
    fn()
    print(json.dumps([_timed(fn) for _ in range(args.repeat)]))


def in_process(args: argparse.Namespace) -> dict[str, list[float]]:
    """One model; every round times one call per variant, switching the fast paths between calls."""
    fn = _workload(args)
    saved = [(owner, name, getattr(owner, name)) for owner, name in switchable()]

    def select(variant: str) -> None:
        for owner, name, value in saved:
            setattr(owner, name, value)
        switch_off(variant)

    times: dict[str, list[float]] = {v: [] for v in args.variants}
    try:
        for variant in args.variants:  # warm-up, and each path's caches
            select(variant)
            fn()
        for _ in range(args.rounds * args.repeat):
            for variant in args.variants:
                select(variant)
                times[variant].append(_timed(fn))
    finally:
        select("all")
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lite")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", type=precision_name, choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    add_overrides_argument(p, "config override, e.g. model.decoder_fp32=false (repeatable)")
    p.add_argument("--in-process", action="store_true", help="alternate the variants inside one process")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    from lgformer import config as config_mod
    from lgformer.errors import LGFormerError

    try:
        config_mod.load(args.preset, args.overrides)
    except LGFormerError as exc:
        p.exit(2, f"speed_ablation: error: {exc}\n")
    if args.in_process:
        if bad := [v for v in args.variants if v in BUILD_TIME]:
            why = "it acts at process start"
            p.exit(2, f"speed_ablation: error: --in-process cannot switch {', '.join(bad)}: {why}\n")
        times = in_process(args)
    else:
        times = in_subprocesses(args)
    load = os.getloadavg()[0]
    what = "training step" if args.train else "forward"
    how = "in one process" if args.in_process else "one process per variant and round"
    print(
        f"{args.preset} {args.size or 'default size'} batch {args.batch} {args.dtype} "
        f"{args.threads} threads, {what}, {how} (load average {load:.2f})"
    )
    for variant, ts in times.items():
        label = "all fast paths" if variant == "all" else f"without {variant}"
        print(f"  {label:<26} min {min(ts) * 1e3:8.1f} ms   median {statistics.median(ts) * 1e3:8.1f} ms")


def in_subprocesses(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each round runs every variant in a fresh child process (`--variant`)."""
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    passthrough = [a for a in sys.argv[1:] if a != "--variants" and a not in args.variants]
    for _ in range(args.rounds):
        for variant in args.variants:
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            if variant == "malloc":
                env["LGFORMER_MALLOC_TUNING"] = "0"
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--variant", variant],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            times[variant] += json.loads(out.stdout.strip().splitlines()[-1])
    return times


if __name__ == "__main__":
    main()
