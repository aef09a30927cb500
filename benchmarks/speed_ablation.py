"""Leave-one-out timing of the network's CPU fast paths (issue 6): what each one is worth today.

    python benchmarks/speed_ablation.py --preset official-swin-b --size 480 --dtype fp32
    python benchmarks/speed_ablation.py --preset lite --size 320 --batch 8 --train
    python benchmarks/speed_ablation.py --preset official-swin-b --dtype bf16 --in-process \
        --variants all prepack window-explicit --set model.decoder_fp32=false

Every variant runs in its own process (fresh allocator state) with one fast path switched off through the
public switch (`lgformer.model.fast`, whose `PATHS` describe each one): `all` switches nothing off,
`malloc` leaves glibc's allocator as it is (LGFORMER_MALLOC_TUNING=0: default mmap/trim thresholds, 4 KB
pages), `hugepages` keeps the tuned heap in 4 KB pages (glibc.malloc.hugetlb=0), `openmp` runs the C
kernels on threads of their own instead of PyTorch's OpenMP workers (LGFORMER_OPENMP=0), and every other
variant is the name of a fast path. Every process is set up as the `lgformer` command sets itself up
(`lgformer.precision.reexec_with_hugepage_heap`, `tune_cpu_allocator`).
Rounds alternate the variants; the table gives min and median seconds per forward (or training step).

--in-process builds one model and alternates the variants call by call inside one process instead, which
cancels the drift of shared cores (±5% between processes); `malloc`, `hugepages` and `openmp` act
when the process starts, so they need separate processes. `plain` switches every fast path off (the paper's
formulation as written) and, in a process of its own, leaves the allocator as `malloc` does: the stand-in
for the authors' code, which runs as a plain Python process.

--against REV adds the code of git revision REV (checked out into a temporary worktree, all its fast paths
on) as one more variant, alternating with this tree's process by process: before/after figures of a change.

    python benchmarks/speed_ablation.py --preset lite --size 320 --batch 8 --train --variants all \
        --against a4b6574 --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lgformer.arguments import add_overrides_argument
from lgformer.precision import autocast, autocast_dtype, precision_name, tune_cpu_allocator

FAST_PATHS = (
    "onednn",
    "bf16-onednn",
    "prepack",
    "fused-act",
    "bert-onednn",
    "channels-last",
    "native-sampler",
    "native-groupnorm",
    "native-layernorm",
    "native-dw",
    "bf16-weights",
    "bag-sampler",
    "bag-backward",
    "short-softmax",
    "window-order",
    "window-explicit",
    "attn-fold",
    "xattn-fold",
    "xattn-explicit",
    "vlba-fold",
    "bn-fold",
    "dw-weight-grad",
    "dw-strided-grad",
    "winograd",
)  # lgformer.model.fast.PATHS, listed here so that `--help` loads no torch
VARIANTS = ["all", "plain", "malloc", "hugepages", "openmp", *FAST_PATHS]


BUILD_TIME = ("malloc", "hugepages", "openmp")  # act when the process starts


def switch_off(variant: str) -> None:
    """Switch off the variant's fast path (nothing for `all`, and for the `BUILD_TIME` ones, which the parent
    sets through the environment; every one for `plain`) and switch every other one on."""
    from lgformer.model import fast

    for path in fast.PATHS:
        fast.set_enabled(path, variant != "plain" and path != variant)


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


def child_environment(variant: str) -> dict[str, str]:
    """The environment of a variant's process; the allocator variants (and `plain`) are set here."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if variant in ("malloc", "plain"):
        env["LGFORMER_MALLOC_TUNING"] = "0"
    elif variant == "hugepages":
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=0"]))
    elif variant == "openmp":
        env["LGFORMER_OPENMP"] = "0"
    return env


def child(args: argparse.Namespace) -> None:
    switch_off(args.variant)
    fn = _workload(args)
    fn()
    print(json.dumps([_timed(fn) for _ in range(args.repeat)]))


def in_process(args: argparse.Namespace) -> dict[str, list[float]]:
    """One model; every round times one call per variant, switching the fast paths between calls."""
    fn = _workload(args)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    try:
        for variant in args.variants:  # warm-up, and each path's caches
            switch_off(variant)
            fn()
        for _ in range(args.rounds * args.repeat):
            for variant in args.variants:
                switch_off(variant)
                times[variant].append(_timed(fn))
    finally:
        switch_off("all")
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
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="REV",
        help="also time git revision REV (repeatable)",
    )
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
    if args.against and args.in_process:
        p.exit(
            2,
            "speed_ablation: error: --against needs a process per call, not --in-process\n",
        )
    if args.in_process:
        if bad := [v for v in args.variants if v in BUILD_TIME]:
            why = "it acts at process start"
            p.exit(2, f"speed_ablation: error: --in-process cannot switch {', '.join(bad)}: {why}\n")
        times = in_process(args)
    else:
        with worktrees(args.against) as trees:
            times = in_subprocesses(args, trees)
    load = os.getloadavg()[0]
    what = "training step" if args.train else "forward"
    how = "in one process" if args.in_process else "one process per variant and round"
    print(
        f"{args.preset} {args.size or 'default size'} batch {args.batch} {args.dtype} "
        f"{args.threads} threads, {what}, {how} (load average {load:.2f})"
    )
    for variant, ts in times.items():
        label = {"all": "all fast paths", "plain": "no fast path"}.get(variant, f"without {variant}")
        if variant == "plain" and not args.in_process:
            label = "no fast path, default malloc"
        if variant.startswith("@"):
            label = f"revision {variant[1:]}"
        print(f"  {label:<26} min {min(ts) * 1e3:8.1f} ms   median {statistics.median(ts) * 1e3:8.1f} ms")


@contextlib.contextmanager
def worktrees(revisions: list[str]) -> Iterator[dict[str, Path]]:
    """A detached git worktree of each revision in a temporary folder, removed afterwards: {rev: folder}."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="lgformer-trees-") as tmp:
        trees: dict[str, Path] = {}
        try:
            for rev in revisions:
                folder = Path(tmp) / rev.replace("/", "_")
                git = ["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", str(folder), rev]
                done = subprocess.run(git, capture_output=True, text=True)
                if done.returncode:
                    why = (done.stderr.strip().splitlines() or ["git failed"])[-1]
                    raise SystemExit(f"speed_ablation: error: --against {rev}: {why}")
                trees[rev] = folder
            yield trees
        finally:
            for folder in trees.values():
                subprocess.run(
                    ["git", "-C", str(repo), "worktree", "remove", "--force", str(folder)], check=False
                )


def in_subprocesses(args: argparse.Namespace, trees: dict[str, Path]) -> dict[str, list[float]]:
    """Each round runs every variant in a fresh child process (`--variant`); a revision's child imports the
    package from its worktree, with all its fast paths on."""
    names = [*args.variants, *(f"@{rev}" for rev in trees)]
    times: dict[str, list[float]] = {v: [] for v in names}
    skip = {"--variants", *args.variants, "--against", *args.against}
    passthrough = [a for a in sys.argv[1:] if a not in skip]
    for _ in range(args.rounds):
        for variant in names:
            env = child_environment(variant)
            child_variant = variant
            if variant.startswith("@"):
                env["PYTHONPATH"] = str(trees[variant[1:]] / "src")
                child_variant = "all"
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--variant", child_variant],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            times[variant] += json.loads(out.stdout.strip().splitlines()[-1])
    return times


if __name__ == "__main__":
    if {"--variant", "--in-process"} & set(sys.argv):  # a process that times the network
        # set up as the `lgformer` command is; the package of an --against revision from before that
        # function starts as that revision's command did
        with contextlib.suppress(ImportError):
            from lgformer.precision import reexec_with_hugepage_heap

            reexec_with_hugepage_heap()
    main()
