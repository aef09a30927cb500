"""Metrics by hand, the report's tables, and `lgformer eval --predictions` on the real refcoco-mini masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MINI
from PIL import Image

from lgformer.cli import main
from lgformer.data.dataset import DataConfig, build_dataset
from lgformer.engine.evaluate import markdown, report
from lgformer.engine.metrics import METRICS, IoUCounts, gres_summary, intersection_union, summarize

DATA_FLAGS = ["--root", str(MINI), "--dataset", "refcoco", "--split-by", "unc", "--split", "val"]


def _mask(h: int, w: int, box: tuple[int, int, int, int] | None) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    if box is not None:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = True
    return m


def test_hand_computed_cases():
    gt = _mask(4, 4, (0, 4, 0, 2))  # left half: 8 pixels
    cases = {
        "empty prediction": (_mask(4, 4, None), gt, 0, 8),
        "empty both": (_mask(4, 4, None), _mask(4, 4, None), 0, 0),
        "empty ground truth": (gt, _mask(4, 4, None), 0, 8),
        "perfect": (gt, gt, 8, 8),
        "half overlap": (_mask(4, 4, (0, 4, 1, 3)), gt, 4, 12),
    }
    pred = torch.stack([c[0] for c in cases.values()])
    target = torch.stack([c[1] for c in cases.values()])
    inter, union, area = intersection_union(pred, target)
    assert area.tolist() == [0, 0, 8, 8, 8]
    assert inter.tolist() == [c[2] for c in cases.values()]
    assert union.tolist() == [c[3] for c in cases.values()]
    s = summarize(inter.numpy(), union.numpy())
    assert s["oIoU"] == pytest.approx(100 * 12 / 36)
    # Per-sentence IoU: 0, 0 (U = 0 counts as 0, as the authors do), 0, 1, 1/3.
    assert s["mIoU"] == pytest.approx(100 * (1 + 1 / 3) / 5)
    assert s["P@0.5"] == s["P@0.9"] == pytest.approx(20.0)
    assert s["sentences"] == 5


def test_precision_thresholds_are_inclusive():
    s = summarize(np.array([5, 6, 7, 8, 9, 10]), np.array([10] * 6))
    assert [s[f"P@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)] == pytest.approx(
        [100, 500 / 6, 400 / 6, 50, 200 / 6]
    )


def test_counts_sum_by_index_and_select():
    counts = IoUCounts(4)
    counts.add(torch.tensor([2, 0]), torch.tensor([1, 3]), torch.tensor([2, 3]), torch.tensor([2, 3]))
    counts.add(torch.tensor([1]), torch.tensor([0]), torch.tensor([5]), torch.tensor([0]))
    assert counts.summary()["sentences"] == 3  # index 3 was never evaluated
    assert counts.summary(np.array([True, False, False, False]))["mIoU"] == pytest.approx(100.0)
    assert counts.summary()["oIoU"] == pytest.approx(100 * 4 / 10)


@pytest.fixture(scope="module")
def mini_val():
    return build_dataset(
        DataConfig(root=str(MINI), dataset="refcoco", split_by="unc", image_size=64), "val", False
    )


def _write_ground_truth(dataset, folder: Path, size: tuple[int, int] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        image = Image.fromarray(dataset.original_mask(i).astype(np.uint8) * 255)
        if size is not None:
            image = image.resize(size, Image.NEAREST)
        image.save(folder / f"{dataset.sentence(i).sent_id}.png")


@pytest.mark.parametrize("protocol", ["resized", "original"])
def test_predictions_equal_to_ground_truth_score_100(tmp_path, capsys, mini_val, protocol):
    _write_ground_truth(mini_val, tmp_path / "pred")
    argv = ["eval", "--predictions", str(tmp_path / "pred"), *DATA_FLAGS, "--image-size", "64"]
    assert main([*argv, "--protocol", protocol, "--json", "--out", str(tmp_path / "report")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["protocol"] == protocol and result["sentences"] == len(mini_val)
    assert all(result[m] == pytest.approx(100.0) for m in METRICS)
    assert sum(b["sentences"] for b in result["by_length"].values()) == len(mini_val)
    assert "| val |" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["reports"]["val"]["oIoU"] == 100.0


def test_predictions_of_another_size_are_resized_with_nearest(tmp_path, capsys, mini_val):
    _write_ground_truth(mini_val, tmp_path / "pred", size=(1000, 1000))
    assert main(["eval", "--predictions", str(tmp_path / "pred"), *DATA_FLAGS, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mIoU"] > 99.0 and result["P@0.9"] == 100.0


def test_missing_predictions_are_listed_or_empty(tmp_path, capsys, mini_val):
    _write_ground_truth(mini_val, tmp_path / "pred")
    missing = mini_val.sentence(0).sent_id
    (tmp_path / "pred" / f"{missing}.png").unlink()
    argv = ["eval", "--predictions", str(tmp_path / "pred"), *DATA_FLAGS, "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{missing}.png" in err and "--missing-as-empty" in err and "\n" not in err
    assert main([*argv, "--missing-as-empty"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mIoU"] == pytest.approx(100 * (len(mini_val) - 1) / len(mini_val))


def test_report_tables(mini_val):
    counts = IoUCounts(len(mini_val))
    n = len(mini_val)
    counts.add(torch.arange(n), torch.full((n,), 3), torch.full((n,), 4), torch.full((n,), 3))
    r = report(counts, mini_val, "resized")
    assert r["oIoU"] == pytest.approx(75.0) and r["P@0.7"] == 100.0 and r["P@0.8"] == 0.0
    assert list(r["by_length"]) == ["1-2", "3-7", "8-12", "13+"] and "by_level" not in r
    assert "gIoU" not in r and "by_kind" not in r  # classic data: the classic report only
    text = markdown({"val": r}, "refcoco (unc)")
    assert "Protocol: `resized`" in text and f"| val | {n} | 75.00 |" in text


def test_gres_metrics_by_hand():
    """Five expressions: a no-target one predicted empty (IoU 1, adds nothing to cIoU), a no-target one
    given 6 pixels (IoU 0, U += 6), a target one predicted empty (I 0, U 8), a perfect target one (8 / 8)
    and a two-object target half found (the union of its referents is the ground truth: 4 / 12)."""
    inter = [0, 0, 0, 8, 4]
    union = [0, 6, 8, 8, 12]
    pred_area = [0, 6, 0, 8, 4]
    no_target = [True, True, False, False, False]
    got = gres_summary(inter, union, pred_area, no_target)
    assert got["gIoU"] == pytest.approx(100 * (1 + 0 + 0 + 1 + 4 / 12) / 5)
    assert got["cIoU"] == pytest.approx(100 * 12 / 34)
    assert got["N-acc"] == pytest.approx(50.0) and got["T-acc"] == pytest.approx(100 * 2 / 3)
    assert got["P@0.5"] == pytest.approx(100 / 3) and got["P@0.9"] == pytest.approx(100 / 3)
    assert (got["no_target"], got["target"]) == (2, 3)
    # a model that always answers "nothing": every no-target right, every target wrong
    nothing = gres_summary([0, 0, 0], [0, 8, 8], [0, 0, 0], [True, False, False])
    assert (nothing["N-acc"], nothing["T-acc"], nothing["cIoU"]) == (100.0, 0.0, 0.0)
    assert nothing["gIoU"] == pytest.approx(100 / 3)
