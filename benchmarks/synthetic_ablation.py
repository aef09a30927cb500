"""Paper Tables 2-4 in miniature: the `lite` preset on the synthetic referring benchmark, per level.

Variants: linguistic query (the paper's model), learnable K=1 and K=10 queries (Table 2), PWAM instead of VLBA
(Table 4). Every variant trains with the identical schedule and budget: same steps, same LR decay horizon
(`train.max_steps`), same warm-up, same seed (so the same data order). Each is then evaluated at the end of
its schedule (`last`, no selection on the evaluation split) on every sentence of the evaluation split,
overall, per level (1 category, 2 attributes, 3 relations, 4 ordinals/negation/two relations) and per
word-length bucket. Results go to OUT/results.json and OUT/results.md.

Re-running the same command continues unfinished variants from their `last` checkpoint and skips finished
ones (and their evaluation, kept as RUN/eval-SPLIT.json), so a long benchmark survives an interrupted
session. `--chunk N` trains the variants in turns of N steps instead of one after the other, so that a
benchmark cut short leaves them all at about the same step; `--hours H` stops starting turns after H hours
and reports the variants where they stand (the table gives each one's steps: a variant short of its schedule
is evaluated mid-schedule, before its learning rate has decayed, and is marked so). Every turn is an
`lgformer train` process; `--jobs N` runs N of them at once on 1/N of the cores each (on a 2-core CPU two
one-thread processes train ~15% more steps an hour than one two-thread process), each writing to its
RUN/console.txt.

    python benchmarks/synthetic_ablation.py --out runs/ablation --steps 600
    python benchmarks/synthetic_ablation.py --out runs/ablation-6k --steps 6000 --chunk 250 --hours 2 \
        --jobs 2 --set data.image_size=256 --set train.workers=1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lgformer.arguments import add_device_argument, add_overrides_argument
from lgformer.files import atomic_write

VARIANTS: dict[str, list[str]] = {
    "linguistic": [],
    "learnable-k1": ["model.query=learnable", "model.num_queries=1"],
    "learnable-k10": ["model.query=learnable", "model.num_queries=10"],
    "pwam": ["model.fusion=pwam"],
}
LEVELS = ("1", "2", "3", "4")
POLL_SECONDS = 0.5  # how often running turns are checked
RESAMPLES = 2000  # bootstrap resamples of the paired differences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="benchmark folder (one run folder per variant)")
    p.add_argument(
        "--data", type=Path, help="synthetic benchmark folder (default OUT/data, generated if absent)"
    )
    p.add_argument("--train", type=int, default=10000, help="training refs to generate (default %(default)s)")
    p.add_argument("--val", type=int, default=200, help="validation refs to generate (default %(default)s)")
    p.add_argument("--test", type=int, default=1000, help="test refs to generate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data and training seed (default %(default)s)")
    p.add_argument(
        "--steps", type=int, default=600, help="optimizer steps of every variant (default %(default)s)"
    )
    p.add_argument(
        "--val-every", type=int, default=200, help="validation interval in steps (default %(default)s)"
    )
    p.add_argument("--chunk", type=int, default=None, help="train the variants in turns of this many steps")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants trained at once, each a process on 1/JOBS of the cores (default %(default)s)",
    )
    p.add_argument("--hours", type=float, default=None, help="start no training turn after this many hours")
    p.add_argument("--eval-split", default="test", help="split of the reported numbers (default %(default)s)")
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS)
    )
    add_overrides_argument(p, "extra config override for every variant (e.g. data.image_size=256)")
    add_device_argument(p)
    args = p.parse_args(argv)
    if args.chunk is not None and args.chunk < 1:
        p.error(f"--chunk {args.chunk}: must be at least 1 step")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be at least 1")
    if args.hours is not None and args.hours < 0:
        p.error(f"--hours {args.hours}: must not be negative")
    return args


def ensure_data(args: argparse.Namespace) -> Path:
    data = args.data or args.out / "data"
    if not (data / "synth" / "refs(synth).p").is_file():
        counts = f"--train {args.train} --val {args.val} --test {args.test} --seed {args.seed}".split()
        cmd = [sys.executable, "-m", "lgformer.cli", "data", "synth", "--out", str(data), *counts]
        print("$", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return data


def variant_overrides(name: str, args: argparse.Namespace, data: Path) -> list[str]:
    """The config overrides that make variant `name` from the `lite` preset."""
    return [
        f"data.root={data}",
        "data.dataset=synth",
        "data.split_by=synth",
        f"train.max_steps={args.steps}",
        f"train.val_every={args.val_every}",
        "train.save_every=50",  # an interrupted session loses at most 50 steps
        f"train.seed={args.seed}",
        *args.overrides,
        *VARIANTS[name],
    ]


def steps_done(run: Path) -> int:
    """Optimizer steps of the run's `last` checkpoint (0 before its first save)."""
    from lgformer.checkpoint import load_training_state

    return load_training_state(run / "last")["step"] if (run / "last").is_dir() else 0


def train_argv(name: str, args: argparse.Namespace, data: Path, *, resume: bool) -> list[str]:
    """The `lgformer` arguments that train variant `name` (a new run, or its run continued from `last`)."""
    overrides = variant_overrides(name, args, data)
    where = ["--resume" if resume else "--out", str(args.out / name)]
    return ["train", "--config", "lite", *(arg for item in overrides for arg in ("--set", item)), *where]


def start_turn(
    name: str, args: argparse.Namespace, data: Path, done: int, goal: int, env: dict[str, str]
) -> subprocess.Popen:
    """Start the `lgformer train` process that takes variant `name` from step `done` to `goal`: its
    output on this terminal, or with `--jobs N > 1` in RUN/console.txt."""
    how = "continuing" if done else "training"
    log = args.out / name / "console.txt"
    where = f"; output in {log}" if args.jobs > 1 else ""
    print(f"== {name}: {how} to step {goal} ({' '.join(VARIANTS[name]) or 'default'}){where}", flush=True)
    command = [sys.executable, "-m", "lgformer.cli", *train_argv(name, args, data, resume=done > 0)]
    command += ["--stop-after", str(goal), "--device", args.device]
    if args.jobs == 1:
        return subprocess.Popen(command, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def train_variants(names: list[str], args: argparse.Namespace, data: Path, deadline: float) -> list[str]:
    """Train every variant to `--steps` in turns of `--chunk` steps (or all at once), each turn an
    `lgformer train` process, `--jobs` of them at a time (the variant furthest behind first; with more
    than one, each on its share of the cores), starting no turn past `deadline` (time.monotonic()).
    Returns the turns that failed."""
    chunk = args.chunk or args.steps
    done = {n: steps_done(args.out / n) for n in names}  # read once: a turn that ends well reaches its goal
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    failed: list[str] = []
    try:
        while True:
            for name, (proc, goal) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    if proc.returncode:
                        where = f", output in {args.out / name / 'console.txt'}" if args.jobs > 1 else ""
                        failed.append(f"{name} (exit {proc.returncode}{where})")
                    else:
                        done[name] = goal
            pending = [n for n in names if n not in running and done[n] < args.steps]
            if failed or time.monotonic() >= deadline:
                pending = []
            if not pending and not running:
                return failed
            for name in sorted(pending, key=done.get)[: args.jobs - len(running)]:
                goal = min(done[name] + chunk, args.steps)
                running[name] = (start_turn(name, args, data, done[name], goal, env), goal)
            time.sleep(POLL_SECONDS)
    finally:  # interrupted (Ctrl-C, SIGTERM): no training process outlives the benchmark
        for proc, _ in running.values():
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()


def evaluate_variant(name: str, args: argparse.Namespace, data: Path) -> dict:
    """Evaluate the variant's `last` checkpoint on the evaluation split (kept as RUN/eval-SPLIT.json and
    reused while `last` stays at the same step)."""
    from lgformer.checkpoint import load_model, load_training_state
    from lgformer.data.dataset import build_dataset
    from lgformer.engine import distributed
    from lgformer.engine.evaluate import evaluate_model, report
    from lgformer.text.tokenizer import Tokenizer

    run = args.out / name
    state = load_training_state(run / "last")
    cached = run / f"eval-{args.eval_split}.json"
    if cached.is_file():
        kept = json.loads(cached.read_text())
        if kept["steps"] == state["step"] and kept.get("schedule") == args.steps and "per_sentence" in kept:
            return kept
    _, device = distributed.setup(args.device)
    model, cfg = load_model(run / "last", device)
    tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)
    dataset = build_dataset(cfg.data, args.eval_split, train=False, tokenizer=tokenizer)
    counts = evaluate_model(
        model, dataset, device, batch_size=cfg.train.batch_size, workers=cfg.train.workers, progress=True
    )
    command = shlex.join(["lgformer", *train_argv(name, args, data, resume=False)])
    result = {
        "variant": name,
        "steps": state["step"],
        "schedule": args.steps,
        "train_seconds": round(state["train_seconds"], 1),
        "command": command,
        "split": args.eval_split,
        **report(counts, dataset, "resized"),
        "per_sentence": {  # for the paired comparison of variants on the same sentences
            "inter": counts.inter.tolist(),
            "union": counts.union.tolist(),
            "image": [str(dataset.referent(i).image_id) for i in range(len(dataset))],
            "level": [dataset.referent(i).level for i in range(len(dataset))],
        },
    }
    atomic_write(cached, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result


def paired_differences(results: list[dict], resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """oIoU of every variant minus the first's, overall and per level, on the same test sentences, with a
    95% interval from a paired bootstrap over the test images (the sentences of one image move together:
    they share a scene). The interval covers the test sample, not the spread between training seeds."""
    ref = results[0]["per_sentence"]
    images, index = np.unique(ref["image"], return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(images), size=(resamples, len(images)))
    levels = np.asarray(ref["level"])
    groups = {"overall": np.ones(len(levels), dtype=bool), **{lv: levels == int(lv) for lv in LEVELS}}

    def oiou(counts: dict, select: np.ndarray) -> tuple[float, np.ndarray]:
        """oIoU of the selection and of each resample of images."""
        inter, union = (
            np.bincount(index[select], np.asarray(counts[k])[select], len(images)) for k in ("inter", "union")
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return inter.sum() / union.sum(), inter[draws].sum(1) / union[draws].sum(1)

    out = []
    for r in results[1:]:
        if r["per_sentence"]["image"] != ref["image"]:
            raise ValueError(f"{r['variant']} was scored on other sentences than {results[0]['variant']}")
        row: dict = {"variant": r["variant"], "against": results[0]["variant"]}
        for group, select in groups.items():
            if select.any():
                (a, boot_a), (b, boot_b) = oiou(ref, select), oiou(r["per_sentence"], select)
                low, high = np.nanpercentile(100 * (boot_b - boot_a), [2.5, 97.5])
                row[group] = {"delta": 100 * (b - a), "low": float(low), "high": float(high)}
        out.append(row)
    return out


def markdown(results: list[dict], differences: list[dict]) -> str:
    """The paper's Tables 2-3 in one: overall metrics and oIoU per level (the synthetic levels are worded
    in the paper's word-length buckets, 1-2, 3-7, 8-12, 13+ words, so the level columns are Table 3's),
    then `paired_differences`."""
    head = "| variant | oIoU | mIoU | P@0.5 | P@0.7 | P@0.9 | " + " | ".join(f"L{lv} oIoU" for lv in LEVELS)
    head += " | steps | train time |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        levels = [r.get("by_level", {}).get(lv, {}).get("oIoU") for lv in LEVELS]
        cells = [
            f"{v:.1f}" if v is not None else "–"
            for v in [r["oIoU"], r["mIoU"], r["P@0.5"], r["P@0.7"], r["P@0.9"], *levels]
        ]
        schedule = r.get("schedule", r["steps"])
        steps = f"{r['steps']}" if r["steps"] >= schedule else f"{r['steps']} of {schedule} (mid-schedule)"
        lines.append(
            f"| {r['variant']} | " + " | ".join(cells) + f" | {steps} | {r['train_seconds'] / 60:.1f} min |"
        )
    first = results[0]
    notes = [
        "",
        f"oIoU / mIoU / P@K in percent on the `{first['split']}` split ({first['sentences']} sentences), "
        f"protocol `{first['protocol']}`, checkpoint at the end of each schedule. Commands:",
        "",
        *[f"    {r['command']}" for r in results],
    ]
    if differences:
        levels = " | ".join(f"L{lv}" for lv in LEVELS)
        head = f"| oIoU minus {first['variant']}'s [95% interval] | overall | {levels} |"
        notes += ["", head, "|---" * (len(LEVELS) + 2) + "|"]
        for row in differences:
            cells = [
                f"{d['delta']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]" if (d := row.get(g)) else "–"
                for g in ("overall", *LEVELS)
            ]
            notes.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
        notes += [
            "",
            f"Intervals: paired bootstrap over the test images ({RESAMPLES:,} resamples); they cover the "
            "test sample only, not the spread between training seeds.",
        ]
    return "\n".join(lines + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    from lgformer import config as config_mod
    from lgformer.errors import LGFormerError

    try:  # a bad --set stops here, before any data or training process
        for name in names:
            config_mod.load("lite", variant_overrides(name, args, args.data or args.out / "data"))
    except LGFormerError as exc:
        print(f"synthetic_ablation: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    data = ensure_data(args)
    deadline = start + args.hours * 3600 if args.hours is not None else float("inf")
    failed = train_variants(names, args, data, deadline)
    if failed:
        print(f"training failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    results = [evaluate_variant(name, args, data) for name in names if steps_done(args.out / name) > 0]
    if not results:
        print("no variant has a checkpoint yet", file=sys.stderr)
        return 1
    differences = paired_differences(results) if len(results) > 1 else []
    table = markdown(results, differences)
    kept = [{k: v for k, v in r.items() if k != "per_sentence"} for r in results]  # each run keeps its own
    atomic_write(args.out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(kept, indent=2)))
    text = json.dumps(differences, indent=2)
    atomic_write(args.out / "differences.json", lambda tmp: Path(tmp).write_text(text))
    atomic_write(args.out / "results.md", lambda tmp: Path(tmp).write_text(table))
    print(table)
    print(f"benchmark wall time this session: {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run `finally` blocks
    sys.exit(main())
