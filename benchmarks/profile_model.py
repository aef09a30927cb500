"""Operator profile of a preset's forward (or training step) with torch.profiler.

    python benchmarks/profile_model.py --preset official-swin-b --size 480 --dtype bf16 --threads 2
    python benchmarks/profile_model.py --preset lite --size 320 --batch 8 --train
    python benchmarks/profile_model.py --preset official-swin-b --dtype bf16 --set model.decoder_fp32=false
    python benchmarks/profile_model.py --preset official-swin-b --size 480 --by-module
    python benchmarks/profile_model.py --preset lite --size 320 --batch 8 --train --phases --runs 5

Prints the operators sorted by self CPU time (CUDA time on GPU), optionally grouped by input shape,
and writes a Chrome trace with --trace FILE. The profiler's own cost inflates some operators (a 4725x256x2048
fp32 product shows 31-33 ms under it on a 2-core Zen 4, 23 ms by the wall clock), so --by-module measures
without it: per module class, the wall time inside its forwards minus that of its child modules (work done by
functions is charged to the module calling them), the GFLOP counted there and their roofline at the GEMM
rates measured in the same process, sorted by the time over the roofline (inference only).
--train --phases splits a training step by the wall clock, without the profiler: forward + loss, backward,
gradient clipping, the AdamW step, zeroing the gradients, and loading one batch of the synthetic benchmark at
the preset's size (`--data DIR`, a `lgformer data synth` folder with a train split; left out without it).
Then, in passes of their own, the backward's exclusive time per module class (backward hooks, with in-place
activations made out-of-place while they are on) and the GFLOP of the step's products and convolutions,
forward and backward, against the GEMM rate measured in the same process. `--json FILE` keeps the report.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lgformer import config as config_mod
from lgformer.arguments import add_dtype_argument, add_overrides_argument
from lgformer.engine import bench
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write
from lgformer.model.build import build_model
from lgformer.precision import autocast, autocast_dtype, reexec_with_hugepage_heap, tune_cpu_allocator


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
    p.add_argument("--by-module", action="store_true", help="wall time against roofline per module class")
    p.add_argument("--phases", action="store_true", help="with --train: a training step part by part")
    p.add_argument("--data", default=None, help="with --phases: a synthetic benchmark folder to load from")
    p.add_argument("--json", type=Path, default=None, help="with --phases: also write the report here")
    add_overrides_argument(p, "config override, e.g. model.decoder_fp32=false (repeatable)")
    args = p.parse_args()
    if args.by_module and args.train:
        p.error("--by-module times inference only")
    if args.phases and not args.train:
        p.error("--phases splits a training step: add --train")
    if args.json and not args.phases:
        p.error("--json writes the --phases report")

    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as every command does (LGFORMER_MALLOC_TUNING=0 leaves it off)
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
    if args.phases:
        report = phases(model, cfg, x, amp, device, args.runs, args.data, args.batch)
        print(format_phases(report))
        if args.json:
            atomic_write(args.json, json.dumps(report, indent=1) + "\n")
        return
    if args.train:
        step = bench.train_step(model, cfg, x, amp, device)
        context = torch.enable_grad
    else:

        def step() -> None:
            with autocast(device, amp):
                model(x["image"], x["mask"], ids=x["ids"])

        context = torch.inference_mode
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if args.by_module:  # flops counted outside inference mode: inside it matmul and conv bypass the counter
        print(by_module(model, step, device, args.runs))
        return
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


def phases(
    model: nn.Module,
    cfg: config_mod.Config,
    x: dict[str, torch.Tensor],
    amp: torch.dtype | None,
    device: torch.device,
    runs: int,
    data: str | None,
    batch: int,
) -> dict:
    """Median wall time of each part of the trainer's step over `runs` steps (after two warm-up steps), the
    backward's exclusive time per module class, and the step's GFLOP against the GEMM roofline."""
    from lgformer.engine.train import (
        build_optimizer,
        clip_gradients,
        freeze,
        lent,
        set_train_mode,
    )
    from lgformer.model.loss import mask_loss

    tc, m = cfg.train, cfg.model
    freeze(model, tc)
    set_train_mode(model, tc)
    optimizer = build_optimizer(model, tc, amp)
    times: dict[str, list[float]] = collections.defaultdict(list)
    backward: dict[str, float] = collections.defaultdict(float)
    stack: list[list] = []

    def now() -> float:
        bench.synchronize(device)
        return time.perf_counter()

    def enter(module: nn.Module, _grad: tuple) -> None:
        stack.append([type(module).__name__, now(), 0.0])

    def leave(module: nn.Module, _grad_in: tuple, _grad_out: tuple) -> None:
        if stack and stack[-1][0] == type(module).__name__:
            name, start, children = stack.pop()
            spent = now() - start
            backward[name] += spent - children
            if stack:
                stack[-1][2] += spent

    def forward_loss() -> torch.Tensor:
        with autocast(device, amp):
            logits = model(
                x["image"], x["mask"], ids=x["ids"], upsample=False, all_outputs=m.loss_all_outputs
            )
            return mask_loss(logits, x["target"], m.loss_pos_weight, m.loss_all_outputs, m.loss_resolution)

    loader = None
    if data is not None:
        from lgformer.data.dataset import build_dataset, collate
        from lgformer.text.tokenizer import Tokenizer

        data_cfg = config_mod.DataConfig(root=data, dataset="synth", image_size=x["image"].shape[-1])
        tokenizer = Tokenizer(m.text_encoder, m.max_tokens)
        dataset = build_dataset(data_cfg, "train", train=True, tokenizer=tokenizer)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate, num_workers=0)

    def step(record: bool) -> None:
        with lent(optimizer):
            t0 = now()
            loss = forward_loss()
            t1 = now()
            loss.backward()
            t2 = now()
            if tc.clip_grad:
                clip_gradients(model, optimizer, tc.clip_grad)
            t3 = now()
            optimizer.step()
            t4 = now()
            optimizer.zero_grad(set_to_none=True)
            t5 = now()
        if loader is not None:
            next(iter(loader))
        t6 = now()
        if record:
            for name, (a, b) in {
                "forward + loss": (t0, t1),
                "backward": (t1, t2),
                "clip gradients": (t2, t3),
                "AdamW step": (t3, t4),
                "zero gradients": (t4, t5),
                "load a batch (1 process)": (t5, t6),
            }.items():
                if loader is not None or not name.startswith("load"):
                    times[name].append(b - a)

    # The parts by the wall clock first, without hooks; then the backward again with a hook on every module
    # (which makes in-place activations out-of-place while they are on, and costs a little itself).
    for k in range(runs + 2):
        step(record=k >= 2)
    inplace = [mod for mod in model.modules() if getattr(mod, "inplace", False)]
    for mod in inplace:
        mod.inplace = False
    handles = [
        hook(fn)
        for mod in model.modules()
        if any(p.requires_grad for p in mod.parameters())
        for hook, fn in (
            (mod.register_full_backward_pre_hook, enter),
            (mod.register_full_backward_hook, leave),
        )
    ]
    try:
        warnings.filterwarnings(
            "ignore", message=".*(backward hook|Full backward hook).*", category=UserWarning
        )
        for _ in range(runs):
            forward_loss().backward()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        for mod in inplace:
            mod.inplace = True
    with bench.FlopsByDtype() as counter:  # forward + backward of one step
        forward_loss().backward()
    optimizer.zero_grad(set_to_none=True)
    rates = {d: bench.gemm_gflops(d, device)["best"] for d in counter.flops}
    gflop = {bench.dtype_name(d): n / 1e9 for d, n in counter.flops.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    return {
        "preset": cfg.preset,
        "size": x["image"].shape[-1],
        "batch": batch,
        "dtype": "fp32" if amp is None else bench.dtype_name(amp),
        "threads": torch.get_num_threads(),
        "device": bench.cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "runs": runs,
        "parts_ms": {name: round(t * 1e3, 1) for name, t in median.items()},
        "step_ms": round(sum(median.values()) * 1e3, 1),
        "backward_by_module_ms": {
            name: round(t / runs * 1e3, 1) for name, t in sorted(backward.items(), key=lambda kv: -kv[1])
        },
        "gflop": gflop,
        "gemm_gflops": {bench.dtype_name(d): round(r, 1) for d, r in rates.items()},
        "roofline_ms": round(sum(n / 1e9 / rates[d] for d, n in counter.flops.items()) * 1e3, 1),
    }


def format_phases(r: dict) -> str:
    """The `phases` report as a table."""
    total = r["step_ms"]
    lines = [
        f"{r['preset']} {r['size']}x{r['size']} batch {r['batch']} {r['dtype']} {r['threads']} threads "
        f"{r['device']} torch {r['torch']} (median of {r['runs']} steps)",
        f"{'part of a training step':34s} {'ms':>9s} {'share':>6s}",
    ]
    for name, t in r["parts_ms"].items():
        lines.append(f"{name:34s} {t:9.1f} {t / total:6.1%}")
    lines.append(f"{'total':34s} {total:9.1f}")
    gflop = ", ".join(f"{d} {g:.1f}" for d, g in r["gflop"].items())
    rates = ", ".join(f"{d} {g:.0f}" for d, g in r["gemm_gflops"].items())
    lines.append(
        f"products and convolutions: {gflop} GFLOP per step; at the GEMM rate ({rates} GFLOP/s) "
        f"{r['roofline_ms']:.0f} ms ({r['roofline_ms'] / total:.0%} of the step)"
    )
    lines += ["", f"{'backward, exclusive, by module class':40s} {'ms':>9s}"]
    for name, t in list(r["backward_by_module_ms"].items())[:25]:
        lines.append(f"{name:40s} {t:9.1f}")
    return "\n".join(lines)


def by_module(model: nn.Module, step: Callable[[], None], device: torch.device, runs: int) -> str:
    """Table of exclusive wall time, GFLOP and roofline per module class over `runs` calls of `step`."""
    stack: list[list] = []  # [class name, start, time spent in child modules]
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    flops: dict[str, dict[torch.dtype, int]] = collections.defaultdict(lambda: collections.defaultdict(int))

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def enter(module: nn.Module, _args: tuple) -> None:
        stack.append([type(module).__name__, now(), 0.0])

    def leave(module: nn.Module, _args: tuple, _out: object) -> None:
        name, start, children = stack.pop()
        spent = now() - start
        seconds[name] += spent - children
        calls[name] += 1
        if stack:
            stack[-1][2] += spent

    class Counter(bench.FlopsByDtype):
        def count(self, dtype: torch.dtype, n: int) -> None:
            flops[stack[-1][0] if stack else "(outside modules)"][dtype] += n

    handles = [
        hook(fn)
        for m in model.modules()
        for hook, fn in ((m.register_forward_pre_hook, enter), (m.register_forward_hook, leave))
    ]
    try:
        with torch.no_grad():
            with torch.inference_mode():
                step()  # warm-up: builds what inference caches (masks, transformed weights) outside the count
            with Counter():
                step()
            with torch.inference_mode():
                seconds.clear()
                calls.clear()
                for _ in range(runs):
                    step()
    finally:
        for handle in handles:
            handle.remove()
    dtypes = {d for per_dtype in flops.values() for d in per_dtype}
    rates = {d: bench.gemm_gflops(d, device)["best"] * 1e9 for d in dtypes}
    rows = []
    for name in seconds.keys() | flops.keys():
        spent = seconds[name] / runs
        roofline = sum(n / rates[d] for d, n in flops[name].items())
        rows.append(
            (spent - roofline, name, calls[name] // runs, spent, sum(flops[name].values()) / 1e9, roofline)
        )
    rows.sort(reverse=True)
    total = sum(r[3] for r in rows), sum(r[4] for r in rows), sum(r[5] for r in rows)
    rate_text = ", ".join(f"{str(d).removeprefix('torch.')} {r / 1e9:.0f}" for d, r in rates.items())
    lines = [
        f"GEMM GFLOP/s: {rate_text}",
        f"{'module class':30s} {'calls':>5s} {'ms':>8s} {'GFLOP':>7s} {'roofline ms':>11s} {'excess ms':>9s}",
    ]
    for excess, name, n, spent, gflop, roofline in rows:
        lines.append(
            f"{name:30s} {n:5d} {spent * 1e3:8.1f} {gflop:7.2f} {roofline * 1e3:11.1f} {excess * 1e3:9.1f}"
        )
    lines.append(f"{'total':30s} {'':5s} {total[0] * 1e3:8.1f} {total[1]:7.2f} {total[2] * 1e3:11.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    reexec_with_hugepage_heap()  # set up as the `lgformer` command is
    main()
