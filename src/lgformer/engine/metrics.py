"""Referring-segmentation metrics (docs/architecture.md#evaluation-protocol): oIoU, mIoU and
precision@0.5..0.9, in percent.

Everything derives from per-sentence integer counts I = |pred ∧ gt| and U = |pred ∨ gt|. Keeping the
counts per dataset index (zero where another rank evaluated) makes the sum over ranks exact and the
result independent of how the sentences were split between processes.
"""

from __future__ import annotations

import numpy as np
import torch

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRICS = ("oIoU", "mIoU", *(f"P@{t}" for t in THRESHOLDS))


def intersection_union(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean (B, H, W) prediction and ground truth -> int64 I, U and the predicted area, each (B,)."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(1).sum(1, dtype=torch.int64)
    union = (pred | target).flatten(1).sum(1, dtype=torch.int64)
    return inter, union, pred.flatten(1).sum(1, dtype=torch.int64)


def two_sided_iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """How far two boolean masks agree: the smaller of the IoU of their foregrounds and of their
    backgrounds (1 for two empty sides). Pixel agreement is near 1 for any mask whose minority side is
    small, and one-sided IoU for a mask that covers most of the image; this falls to 0 when either
    prediction is all foreground or all background and the other is not."""
    a, b = torch.as_tensor(a).bool(), torch.as_tensor(b).bool()
    sides = []
    for x, y in ((a, b), (~a, ~b)):
        union = int((x | y).sum())
        sides.append(int((x & y).sum()) / union if union else 1.0)
    return min(sides)


def summarize(inter: np.ndarray, union: np.ndarray) -> dict[str, float | int]:
    """Metrics of a set of sentences from their I and U. A sentence with U = 0 (empty prediction and
    empty ground truth) has IoU 0, as the authors count it; oIoU of an empty total union is 0."""
    inter = np.asarray(inter, dtype=np.int64)
    union = np.asarray(union, dtype=np.int64)
    n = int(inter.size)
    iou = np.divide(inter, union, out=np.zeros(n, dtype=np.float64), where=union > 0)
    total_union = int(union.sum())
    out: dict[str, float | int] = {
        "oIoU": 100.0 * int(inter.sum()) / total_union if total_union else 0.0,
        "mIoU": 100.0 * float(iou.mean()) if n else 0.0,
    }
    for t in THRESHOLDS:
        out[f"P@{t}"] = 100.0 * float((iou >= t).mean()) if n else 0.0
    out["sentences"] = n
    return out


GRES_METRICS = ("gIoU", "cIoU", "N-acc", "T-acc")


def gres_summary(
    inter: np.ndarray, union: np.ndarray, pred_area: np.ndarray, no_target: np.ndarray
) -> dict[str, float | int]:
    """gRefCOCO's metrics (as ReLA's evaluator defines them) from per-expression counts, in percent.

    `no_target` marks the expressions that name nothing (their ground truth is empty); "predicted empty"
    is an empty mask (`pred_area` 0). gIoU: the mean per-expression IoU, where a no-target expression
    counts 1 if predicted empty, else 0. cIoU: cumulative I over cumulative U; a no-target expression
    predicted empty adds nothing, one given a mask adds its area to U. N-acc: no-target expressions
    predicted empty over all no-target ones; T-acc: target expressions predicted non-empty over all target
    ones. P@X: over the target expressions. Counts: `no_target` and `target` expressions."""
    inter, union = np.asarray(inter, dtype=np.int64), np.asarray(union, dtype=np.int64)
    empty_pred, no_target = np.asarray(pred_area) == 0, np.asarray(no_target, dtype=bool)
    iou = np.divide(inter, union, out=np.zeros(inter.size, dtype=np.float64), where=union > 0)
    iou = np.where(no_target, empty_pred.astype(np.float64), iou)
    n, n_nt = int(inter.size), int(no_target.sum())
    total_union = int(union.sum())
    out: dict[str, float | int] = {
        "gIoU": 100.0 * float(iou.mean()) if n else 0.0,
        "cIoU": 100.0 * int(inter.sum()) / total_union if total_union else 0.0,
        "N-acc": 100.0 * float((empty_pred & no_target).sum()) / n_nt if n_nt else 0.0,
        "T-acc": 100.0 * float((~empty_pred & ~no_target).sum()) / (n - n_nt) if n > n_nt else 0.0,
    }
    for t in THRESHOLDS:
        out[f"P@{t}"] = 100.0 * float((iou[~no_target] >= t).mean()) if n > n_nt else 0.0
    out["no_target"], out["target"] = n_nt, n - n_nt
    return out


class IoUCounts:
    """Per-sentence I/U of a dataset of `size` sentences, filled as batches are evaluated.

    `all_reduce()` sums the tables of all ranks (each rank fills only its own indices), after which every
    rank holds the complete, exactly identical table.
    """

    def __init__(self, size: int) -> None:
        self.inter = torch.zeros(size, dtype=torch.int64)
        self.union = torch.zeros(size, dtype=torch.int64)
        self.pred_area = torch.zeros(size, dtype=torch.int64)  # 0: predicted empty ("nothing matches")
        self.seen = torch.zeros(size, dtype=torch.int64)

    def add(
        self, indices: torch.Tensor, inter: torch.Tensor, union: torch.Tensor, pred_area: torch.Tensor
    ) -> None:
        indices = indices.long().cpu()
        self.inter[indices] += inter.cpu()
        self.union[indices] += union.cpu()
        self.pred_area[indices] += pred_area.cpu()
        self.seen[indices] += 1

    def all_reduce(self) -> None:
        from lgformer.engine.distributed import all_reduce_sum

        for table in (self.inter, self.union, self.pred_area, self.seen):
            table.copy_(all_reduce_sum(table))

    def _kept(self, select: np.ndarray | None) -> np.ndarray:
        """The evaluated sentences, optionally restricted to a boolean selection."""
        keep = self.seen.numpy() > 0
        return keep if select is None else keep & select

    def summary(self, select: np.ndarray | None = None) -> dict[str, float | int]:
        """Metrics over the evaluated sentences, optionally restricted to a boolean selection."""
        keep = self._kept(select)
        return summarize(self.inter.numpy()[keep], self.union.numpy()[keep])

    def gres(self, no_target: np.ndarray, select: np.ndarray | None = None) -> dict[str, float | int]:
        """`gres_summary` over the evaluated sentences (optionally a selection); `no_target` per index."""
        keep = self._kept(select)
        tables = (self.inter, self.union, self.pred_area)
        return gres_summary(*(t.numpy()[keep] for t in tables), np.asarray(no_target)[keep])
