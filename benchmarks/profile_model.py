"""Operator profile of a preset's forward (or training step) with torch.profiler.

    python benchmarks/profile_model.py --preset official-swin-b --size 480 --dtype bf16 --threads 2
    python benchmarks/profile_model.py --preset lite --size 320 --batch 8 --train
    python benchmarks/profile_model.py --preset official-swin-b --dtype bf16 --set model.decoder_fp32=false

Prints the operators sorted by self CPU time (CUDA time on GPU), optionally grouped by input shape,
and writes a Chrome trace with --trace FILE.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lgformer import config as config_mod
from lgformer.cli import add_dtype_argument, add_overrides_argument
from lgformer.engine import bench
from lgformer.errors import LGFormerError
from lgformer.model.build import build_model
from lgformer.precision import autocast, autocast_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lite")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    add_dtype_argument(p, "fp32 or autocast dtype (default fp32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", action="store_true", help="profile one optimiser step instead of inference")
    p.add_argument("--runs", type=int, default=1, help="profiled calls (after two warm-up calls)")
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--shapes", action="store_true", help="group rows by input shapes")
    p.add_argument("--trace", default=None, help="write a Chrome trace here")
    add_overrides_argument(p, "config override, e.g. model.decoder_fp32=false (repeatable)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        cfg = config_mod.load(args.preset, args.overrides)
    except LGFormerError as exc:
        p.exit(2, f"profile_model: error: {exc}\n")
    size = args.size or cfg.data.image_size
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).to(device).eval()
    x = bench.make_inputs(cfg, size, args.batch, device)
    amp = autocast_dtype(args.dtype)
    if args.train:
        step = bench.train_step(model, cfg, x, amp, device)
        context = torch.enable_grad
    else:

        def step() -> None:
            with autocast(device, amp):
                model(x["image"], x["mask"], ids=x["ids"])

        context = torch.inference_mode
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with context():
        for _ in range(2):
            step()
        with profile(activities=activities, record_shapes=args.shapes) as prof:
            for _ in range(args.runs):
                step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=args.shapes).table(sort_by=key, row_limit=args.rows)
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
