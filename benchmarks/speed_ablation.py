"""Leave-one-out timing of the network's CPU fast paths (issue 6): what each one is worth today.

    python benchmarks/speed_ablation.py --preset official-swin-b --size 480 --dtype fp32
    python benchmarks/speed_ablation.py --preset lite --size 320 --batch 8 --train

Every variant runs in its own process (fresh allocator state), with one fast path switched off:
  all            nothing switched off
  malloc         glibc keeps its default mmap/trim thresholds (LGFORMER_MALLOC_TUNING=0)
  onednn         fp32 products through F.linear / conv2d (MKL sgemm) instead of oneDNN
  bf16-onednn    bf16 autocast products through autocast's F.linear (activations unfused)
  bf16-prepack   bf16 oneDNN products cast and block their weights on every call
  fused-act      oneDNN products without the fused ReLU/GELU/tanh (applied separately)
  bert-onednn    the text encoder keeps plain nn.Linear
  channels-last  the EfficientNet-Lite2 trunk runs NCHW
  msda-backward  deformable sampling differentiated through embedding_bag (sorting backward)
  window-sdpa    Swin window attention through the fused SDPA kernel in CPU inference too
Rounds alternate the variants; the table gives min and median seconds per forward (or training step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = [
    "all",
    "malloc",
    "onednn",
    "bf16-onednn",
    "bf16-prepack",
    "fused-act",
    "bert-onednn",
    "channels-last",
    "msda-backward",
    "window-sdpa",
]


def switch_off(variant: str) -> None:
    """Apply one variant's patch in this (child) process, before the model is built."""
    import torch
    from torch import Tensor

    from lgformer.model import deformable_attention, efficientnet, layers, lgformer, swin

    if variant == "onednn":
        layers.ONEDNN = False
    elif variant == "bf16-prepack":
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
        lgformer.use_fast_linear = lambda module: module
    elif variant == "channels-last":

        def nchw_stem(self: efficientnet.Stem, x: Tensor) -> Tensor:
            return self.act(self.bn(self.conv(torch.addcmul(self.input_shift, x, self.input_scale))))

        efficientnet.Stem.forward = nchw_stem
    elif variant == "msda-backward":
        deformable_attention.ms_deform_attn_sample = deformable_attention._bag_sample
    elif variant == "window-sdpa":
        swin._explicit_attention = swin._fused_attention
    elif variant not in ("all", "malloc"):
        raise SystemExit(f"unknown variant {variant}")


def child(args: argparse.Namespace) -> None:
    import time

    import torch

    from lgformer import config as config_mod
    from lgformer.engine import bench
    from lgformer.model.build import build_model

    switch_off(args.variant)
    torch.set_num_threads(args.threads)
    cfg = config_mod.load(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    dev = torch.device("cpu")
    x = bench.make_inputs(cfg, args.size or cfg.data.image_size, args.batch, dev)
    amp = bench.DTYPES[args.dtype]
    if args.train:
        fn = bench.train_step(model, cfg, x, amp, dev)
    else:

        def fn() -> None:
            with torch.inference_mode(), bench.autocast(dev, amp):
                model(x["image"], x["mask"], ids=x["ids"])

    fn()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lite")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", action="store_true")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        child(args)
        return
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
    load = os.getloadavg()[0]
    what = "training step" if args.train else "forward"
    print(
        f"{args.preset} {args.size or 'default size'} batch {args.batch} {args.dtype} "
        f"{args.threads} threads, {what} (load average {load:.2f})"
    )
    for variant, ts in times.items():
        label = "all fast paths" if variant == "all" else f"without {variant}"
        print(f"  {label:<26} min {min(ts) * 1e3:8.1f} ms   median {statistics.median(ts) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
