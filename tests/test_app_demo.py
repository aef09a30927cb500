"""`lgformer demo`: gallery, page and per-level oIoU from a checkpoint (here a lite one with untrained heads),
and a clear message when the default model is not installed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SHARED, head_checkpoint, save_lite_checkpoint
from PIL import Image

from lgformer import shipped
from lgformer.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_lite_checkpoint(tmp_path_factory.mktemp("lite"), "data.image_size=96")


def test_demo_scores_every_level_and_draws_the_gallery(checkpoint, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--checkpoint", str(checkpoint), "--out", str(out), "--eval-refs", "12", "--scenes", "4"]
    assert main([*argv, "--real", "none", "--device", "cpu", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for level in (
        "1 (shape)",
        "2 (attributes)",
        "3 (one relation)",
        "4 (ordinal, negation or two relations)",
    ):
        assert re.search(rf"{re.escape(level)}\s+\d+\s+\d+\.\d\s+\d+\.\d", printed), level
    assert re.search(r"all\s+\d+\s+\d+\.\d", printed)
    assert f"gallery: {(out / 'gallery.png').resolve()}" in printed and "index.html" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["by_level"]) == ["1", "2", "3", "4"] and summary["held_out"]["refs"] == 12
    assert {tile["level"] for tile in summary["gallery"]} == {1, 2, 3, 4}  # scene i is of level 1 + i % 4
    assert len(summary["gallery"]) >= 8  # several expressions per scene
    page = (out / "index.html").read_text()
    for tile in summary["gallery"]:
        assert (out / tile["file"]).is_file() and tile["file"] in page
    gallery = Image.open(out / "gallery.png")
    assert gallery.width > 1000 and gallery.height > 320


def test_a_model_with_the_head_shows_plural_and_absent_expressions(tmp_path, capsys):
    """With the no-target head (here fixed to answer "nothing" everywhere), the demo adds the held-out scenes'
    plural and absent expressions: every absent one is answered "nothing matches" (an empty mask, IoU 1 by the
    GRES convention) and every plural one, given no mask, scores IoU 0."""
    checkpoint = head_checkpoint(tmp_path / "head", -20.0)
    out = tmp_path / "demo"
    argv = ["demo", "--checkpoint", str(checkpoint), "--out", str(out), "--eval-refs", "4", "--scenes", "4"]
    assert main([*argv, "--real", "none", "--device", "cpu", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    sets = json.loads((out / "summary.json").read_text())["sets"]
    assert sets["absent"] >= 1 and sets["plural"] >= 1 and sets["nothing_matches"] == sets["absent"]
    assert sets["plural_mIoU"] == 0.0
    line = f'{sets["absent"]} expressions naming nothing, answered "nothing matches" {sets["absent"]} times'
    assert f"nothing matches / all of these: {line}" in printed
    tiles = json.loads((out / "summary.json").read_text())["gallery"]
    kinds = [t for t in tiles if t["level"] in ("plural", "no target")]
    assert len(kinds) == sets["absent"] + sets["plural"]
    assert all(t["iou"] == (1.0 if t["level"] == "no target" else 0.0) for t in kinds)
    page = (out / "index.html").read_text()
    assert "Nothing matches / all of these" in page and all(t["file"] in page for t in kinds)


def test_demo_shows_real_photos_first(checkpoint, tmp_path, capsys):
    """With real sentences at hand (here 6 referents of coco-subset's refcoco-real.jsonl), the demo scores
    them at the photos' own size and draws every referent before the synthetic scenes."""
    real = SHARED / "data" / "coco-subset" / "refcoco-real.jsonl"
    lines = []
    for line in real.read_text().splitlines()[:6]:
        record = json.loads(line)
        record["image"] = str(real.parent / record["image"])
        lines.append(json.dumps(record))
    subset = tmp_path / "real.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    out = tmp_path / "demo"
    argv = ["demo", "--checkpoint", str(checkpoint), "--out", str(out), "--eval-refs", "4", "--scenes", "1"]
    assert main([*argv, "--real", str(subset), "--device", "cpu", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    sentences = sum(len(json.loads(line)["sentences"]) for line in lines)
    assert re.search(rf"real photos: {sentences} RefCOCO sentences .* oIoU \d+\.\d", printed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["real"]["sentences"] == sentences and summary["real"]["photos"] >= 1
    real_tiles = [t for t in summary["gallery"] if t["level"] == "real"]
    assert len(real_tiles) == 6 and summary["gallery"][:6] == real_tiles  # real photos first
    page = (out / "index.html").read_text()
    assert page.index("Real photos") < page.index("Synthetic scenes")
    assert all((out / t["file"]).is_file() and t["file"] in page for t in real_tiles)


def test_demo_without_the_default_model_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(shipped.SHIPPED, "lite", tmp_path / "not-installed")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "default 'lite' model is not installed" in err and "lgformer demo --train" in err
    assert not (tmp_path / "demo").exists()
