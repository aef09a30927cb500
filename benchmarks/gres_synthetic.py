"""Generalized referring segmentation on the synthetic benchmark (issue 23's proof): checkpoints on the
held-out split of a `--generalized` benchmark, by the GRES protocol (gIoU, cIoU, N-acc, T-acc; ReLA's
definitions, `lgformer.engine.metrics.gres_summary`) overall, per kind (single / multi / no-target) and per
level, and by the classic protocol (oIoU) on its single-object expressions, which are the classic benchmark's
test split. A model without the no-target head always gives a mask: its N-acc is 0 by construction.

    python benchmarks/gres_synthetic.py --root data/synth-gres --split test \
        --checkpoints classic=runs/lite-synth head=runs/synth-gres-ft/best \
        --out benchmarks/results/gres_synthetic.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from lgformer.checkpoint import load_model, resolve_checkpoint
from lgformer.config import DataConfig
from lgformer.data.dataset import build_dataset
from lgformer.engine.bench import cpu_name
from lgformer.engine.evaluate import evaluate_model, report
from lgformer.files import atomic_write
from lgformer.text.tokenizer import Tokenizer

KINDS = ("single", "multi", "no-target")


def score(checkpoint: str, root: str, split: str) -> dict[str, Any]:
    """The report of `lgformer eval` (resized protocol) for one checkpoint on the benchmark's `split`."""
    model, cfg = load_model(resolve_checkpoint(checkpoint))
    tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)
    data_cfg = DataConfig(root=root, dataset="synth", split_by="synth", image_size=cfg.data.image_size)
    data = build_dataset(data_cfg, split, train=False, tokenizer=tokenizer)
    counts = evaluate_model(model.eval(), data, torch.device("cpu"), progress=True)
    return report(counts, data, "resized")


def table(results: dict[str, dict[str, Any]]) -> str:
    """One row per model: the GRES metrics overall, cIoU per kind, the classic oIoU of the single-object
    expressions, gIoU per level."""
    levels = sorted(next(iter(results.values()))["by_level"])
    head = ["model", "gIoU", "cIoU", "N-acc", "T-acc", *(f"cIoU {k}" for k in KINDS[:2]), "single oIoU"]
    head += [f"gIoU L{lv}" for lv in levels]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        kinds = r["by_kind"]
        cells = [
            r["gIoU"],
            r["cIoU"],
            r["N-acc"],
            r["T-acc"],
            kinds["single"]["cIoU"],
            kinds["multi"]["cIoU"],
        ]
        cells += [kinds["single"]["oIoU"], *(r["by_level"][lv]["gIoU"] for lv in levels)]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a `lgformer data synth --generalized` folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="NAME=CHECKPOINT (folder or `lite`)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every report")
    args = parser.parse_args()
    named = dict(item.split("=", 1) for item in args.checkpoints)
    results = {name: score(path, args.root, args.split) for name, path in named.items()}
    print(table(results))
    if args.out is not None:
        record = {"cpu": cpu_name(), "checkpoints": named, "reports": results}
        atomic_write(args.out, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
