"""Evaluation (docs/architecture.md#evaluation-protocol): every (ref, sentence) pair, metrics overall, per
word-length bucket (paper Table 3)
and per synthetic complexity level, under one of two protocols named in every report:

- `resized` (the authors' code, default; compares with the paper's Table 1): the prediction at the network
  input size S x S against the ground truth resized to S x S with nearest;
- `original` (the paper's text): the 1/4-scale logits upsampled bilinearly to the original image size,
  against the original-size ground truth.

The prediction is `logits[:, -1] > 0` (sigmoid > 0.5 on the last output), or empty where a model with the
no-target head says nothing matches. Masks from another system can be scored instead (`evaluate_predictions`;
an all-zero PNG answers "nothing"). Data with no-target or multi-target expressions (gRefCOCO, generalized
synthetic, JSONL) is also scored by the GRES protocol: gIoU, cIoU, N-acc, T-acc (`metrics.gres_summary`),
overall, per kind (single / multi / no-target) and per level. Under torchrun each rank takes every
world-size-th sentence and the integer counts are summed by index, so the result does not depend on the
number of ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from lgformer.data.images import load_image
from lgformer.engine import distributed as D
from lgformer.engine.metrics import GRES_METRICS, METRICS, IoUCounts, intersection_union
from lgformer.errors import LGFormerError
from lgformer.precision import autocast
from lgformer.render import mask_image, overlay, save_png

if TYPE_CHECKING:
    from lgformer.data.dataset import ReferDataset

PROTOCOLS = ("resized", "original")
Sink = Callable[[int, np.ndarray], None]  # (dataset index, predicted mask bool (H, W)) -> None


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise LGFormerError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not D.world().main, dynamic_ncols=True, leave=False)


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    dataset: ReferDataset,
    device: torch.device,
    *,
    protocol: str = "resized",
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    workers: int = 0,
    progress: bool = False,
    sink: Sink | None = None,
    no_target_threshold: float = 0.5,
) -> IoUCounts:
    """Per-sentence I/U of `model` (in eval mode) on `dataset`, complete on every rank. A model with the
    no-target head predicts an empty mask where its no-target probability is above `no_target_threshold`."""
    from lgformer.data.dataset import collate

    check_protocol(protocol)
    counts = IoUCounts(len(dataset))
    indices = D.shard(len(dataset), D.world())
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, num_workers=workers, collate_fn=collate
    )
    bar = _progress(len(indices), f"eval {protocol}") if progress else None
    for batch in loader:
        with autocast(device, dtype):
            logits, target = model(
                batch["image"].to(device),
                batch["text_mask"].to(device),
                ids=batch["ids"].to(device),
                upsample=False,
                all_outputs=False,
                with_target=True,
            )
        last = logits.float()
        if target is not None:
            nothing = 1 - target.float().sigmoid() > no_target_threshold
            last = last.masked_fill(nothing[:, None, None, None], -1.0)
        if protocol == "resized":
            pred = (
                F.interpolate(last, size=batch["mask"].shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                > 0
            )
            inter, union, area = intersection_union(pred.cpu(), batch["mask"] > 0.5)
            preds = list(pred.cpu().numpy())
        else:
            preds, inter, union, area = [], [], [], []
            for row, index in enumerate(batch["index"].tolist()):
                gt = torch.from_numpy(dataset.original_mask(index))
                pred = (
                    F.interpolate(last[row : row + 1], size=gt.shape, mode="bilinear", align_corners=False)[0]
                    > 0
                )
                i, u, a = intersection_union(pred.cpu(), gt[None])
                preds.append(pred[0].cpu().numpy())
                inter.append(i)
                union.append(u)
                area.append(a)
            inter, union, area = torch.cat(inter), torch.cat(union), torch.cat(area)
        counts.add(batch["index"], inter, union, area)
        if sink is not None:
            for index, pred in zip(batch["index"].tolist(), preds):
                sink(index, pred)
        if bar is not None:
            bar.update(len(preds))
    if bar is not None:
        bar.close()
    counts.all_reduce()
    return counts


def ground_truth(dataset: ReferDataset, index: int, protocol: str) -> np.ndarray:
    """Ground truth of item `index` under `protocol`, bool: (S, S) resized with nearest, or original size."""
    from lgformer.data.images import mask_tensor

    mask = dataset.original_mask(index)
    return mask if protocol == "original" else mask_tensor(mask, dataset.image_size).numpy() > 0.5


class ScoringWarning(UserWarning):
    """Predictions were scored, but not as they were given (e.g. stretched to their image's shape)."""


def evaluate_predictions(
    directory: str | Path,
    dataset: ReferDataset,
    *,
    protocol: str = "resized",
    missing_as_empty: bool = False,
    progress: bool = False,
) -> IoUCounts:
    """Score masks of any system: `<sent_id>.png` per sentence (non-zero = object, any size, resized with
    nearest to the protocol's size). Missing files are an error listing the first ids, or empty masks."""
    from lgformer.data.masks import read_mask_png

    check_protocol(protocol)
    directory = Path(directory)
    if not directory.is_dir():
        raise LGFormerError(f"--predictions {directory}: not a folder")
    ids = [dataset.sentence(i).sent_id for i in range(len(dataset))]
    missing = [str(s) for s in ids if not (directory / f"{s}.png").is_file()]
    if missing and not missing_as_empty:
        raise LGFormerError(
            f"{directory}: no prediction for {len(missing)} of {len(ids)} sentences (first: "
            f"{', '.join(m + '.png' for m in missing[:5])}); pass --missing-as-empty to count them as empty"
        )
    counts = IoUCounts(len(dataset))
    indices = D.shard(len(dataset), D.world())
    bar = _progress(len(indices), f"score {protocol}") if progress else None
    stretched = 0
    for index in indices:
        gt = ground_truth(dataset, index, protocol)
        path = directory / f"{ids[index]}.png"
        if path.is_file():
            pred = read_mask_png(path, str(path))
            if protocol == "original" and pred.shape != gt.shape:
                ratio = (pred.shape[0] * gt.shape[1]) / (pred.shape[1] * gt.shape[0])
                stretched += abs(ratio - 1) > 0.01
            if pred.shape != gt.shape:
                resized = Image.fromarray(pred.astype(np.uint8)).resize(gt.shape[::-1], Image.NEAREST)
                pred = np.asarray(resized) > 0
        else:
            pred = np.zeros_like(gt)
        counts.add(
            torch.tensor([index]),
            *intersection_union(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None]),
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if stretched:
        warnings.warn(
            f"{directory}: {stretched} prediction PNG(s) have another aspect ratio than their image; "
            "they were stretched to it",
            ScoringWarning,
            stacklevel=2,
        )
    counts.all_reduce()
    return counts


def report(counts: IoUCounts, dataset: ReferDataset, protocol: str) -> dict[str, Any]:
    """Metrics overall (in percent), `by_length` over the paper's word buckets and, when the data has
    complexity levels (synthetic benchmark), `by_level`. Data with no-target or multi-target expressions
    adds the GRES metrics beside the classic ones, overall, per level and `by_kind`. Empty groups report only
    `sentences: 0`."""
    from lgformer.data.sources import TARGET_KINDS, target_kind
    from lgformer.text.lengths import BUCKETS, count_words, length_bucket

    n = len(dataset)
    buckets = np.array([length_bucket(count_words(dataset.sentence(i).text)) for i in range(n)])
    levels = np.array([dataset.referent(i).level for i in range(n)])
    targets = np.array([dataset.referent(i).targets for i in range(n)], dtype=np.int64)
    gres = (targets != 1).any()
    no_target = targets == 0

    def group(select: np.ndarray | None) -> dict[str, Any]:
        summary = counts.summary(select)
        if not summary["sentences"]:
            return {"sentences": 0}
        return {**summary, **counts.gres(no_target, select)} if gres else summary

    out: dict[str, Any] = {"protocol": protocol, "gt_rule": dataset.gt_rule, **group(None)}
    out["by_length"] = {b: group(buckets == b) for b in BUCKETS}
    if (levels > 0).any():
        out["by_level"] = {str(lv): group(levels == lv) for lv in sorted(set(levels.tolist()) - {0})}
    if gres:
        kinds = np.array([target_kind(t) for t in targets.tolist()])
        out["by_kind"] = {kind: group(kinds == kind) for kind in TARGET_KINDS}
    return out


def markdown(reports: dict[str, dict[str, Any]], title: str) -> str:
    """One table row per split (like the paper's Table 1), then the per-length and per-level tables; with
    GRES data, the GRES metrics per split and per kind."""
    first = next(iter(reports.values()))
    lines = [
        f"## {title}",
        "",
        f"Protocol: `{first['protocol']}`; ground-truth rule: `{first['gt_rule']}`.",
        "",
    ]
    lines += _table("split", reports)
    if "by_kind" in first:
        lines += ["", "GRES protocol (gRefCOCO): P@X over the expressions that name something.", ""]
        lines += _table("split", reports, GRES_COLUMNS)
    for split, r in reports.items():
        lines += ["", f"### {split}: by expression length (words)", ""] + _table("words", r["by_length"])
        if "by_level" in r:
            lines += ["", f"### {split}: by complexity level", ""] + _table("level", r["by_level"])
        if "by_kind" in r:
            lines += ["", f"### {split}: by kind (GRES)", ""] + _table("kind", r["by_kind"], GRES_COLUMNS)
    return "\n".join(lines) + "\n"


GRES_COLUMNS = (*GRES_METRICS, "P@0.5", "P@0.7", "P@0.9")


def _table(key: str, rows: dict[str, dict[str, Any]], columns: tuple[str, ...] = METRICS) -> list[str]:
    lines = [f"| {key} | sentences | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, r in rows.items():
        cells = [f"{r[m]:.2f}" if m in r else "–" for m in columns]
        lines.append(f"| {name} | {r['sentences']} | " + " | ".join(cells) + " |")
    return lines


class MaskWriter:
    """`--save-masks`: `<sent_id>.png` (0/255) at the protocol's size, readable back by `--predictions`;
    `--save-overlays`: the first `limit` items drawn by `lgformer.render.overlay` on the original image,
    the ground truth outlined."""

    def __init__(self, dataset: ReferDataset, masks: Path | None, overlays: Path | None, limit: int) -> None:
        self.dataset = dataset
        self.masks = masks
        self.overlays = overlays
        self.limit = limit
        for folder in (masks, overlays):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, index: int, pred: np.ndarray) -> None:
        sent_id = self.dataset.sentence(index).sent_id
        if self.masks is not None:
            save_png(self.masks / f"{sent_id}.png", mask_image(pred))
        if self.overlays is not None and index < self.limit:
            image = load_image(self.dataset.image_path(index))
            pred = np.asarray(Image.fromarray(pred.astype(np.uint8)).resize(image.size, Image.NEAREST)) > 0
            text = self.dataset.sentence(index).text
            drawn = overlay(
                image,
                pred,
                text,
                "prediction filled, ground truth outlined",
                self.dataset.original_mask(index),
            )
            save_png(self.overlays / f"{sent_id}.png", drawn)
