"""`lgformer data stats | check | export-jsonl` on the real data, and the paper's length buckets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lgformer.cli import main
from lgformer.data import length_bucket


def test_length_buckets_are_the_papers() -> None:
    assert [length_bucket(n) for n in (1, 2, 3, 7, 8, 12, 13, 40)] == [
        "1-2",
        "1-2",
        "3-7",
        "3-7",
        "8-12",
        "8-12",
        "13+",
        "13+",
    ]


def test_stats_on_refcoco_plus_val_sentences(shared_data: Path, capsys: pytest.CaptureFixture) -> None:
    csv = str(shared_data / "refer-sentences" / "refcoco+_unc_val.csv")
    assert main(["data", "stats", "--root", csv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["sentences"], report["refs"], report["images"]) == (10758, 3805, 1500)
    assert list(report["length_buckets"]) == ["1-2", "3-7", "8-12", "13+"]
    assert sum(report["length_buckets"].values()) == 10758 and all(report["length_buckets"].values())
    tokens = report["tokens"]
    assert (
        tokens["max_tokens"] == 20 and 0 < tokens["truncated_share"] < 0.01 and tokens["p50"] < tokens["p99"]
    )

    assert main(["data", "stats", "--root", csv]) == 0
    text = capsys.readouterr().out
    assert "sentences     10,758" in text and "refs           3,805" in text
    for bucket in ("1-2:", "3-7:", "8-12:", "13+:"):
        assert bucket in text


def test_stats_check_and_export_on_refcoco_mini(shared_data: Path, tmp_path: Path, capsys) -> None:
    root = shared_data / "refcoco-mini"
    assert (
        main(["data", "stats", "--root", str(root), "--dataset", "refcoco", "--split", "val", "--json"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["refs"], report["sentences"], report["images"], report["objects"]) == (3, 9, 3, 3)

    assert main(["data", "check", "--root", str(root), "--dataset", "refcoco+"]) == 0
    assert "checked 3 images and 3 masks (gt rule exactly_one)" in capsys.readouterr().out

    out = tmp_path / "mini.jsonl"
    assert main(["data", "export-jsonl", "--root", str(root), "--dataset", "refcoco", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert main(["data", "check", "--root", str(out), "--dataset", "jsonl"]) == 0


def test_check_reports_missing_and_corrupt_files_without_stopping(
    shared_data: Path, writable_copy, capsys
) -> None:
    root = writable_copy(shared_data / "refcoco-mini")
    photos = sorted(root.rglob("*.jpg"))
    photos[0].write_bytes(photos[0].read_bytes()[:3000])
    photos[1].unlink()
    assert main(["data", "check", "--root", str(root), "--dataset", "refcoco"]) == 1
    captured = capsys.readouterr()
    assert f"corrupt image: {photos[0]}: cannot decode image" in captured.out + captured.err
    assert f"missing image: {photos[1]}" in captured.out + captured.err
    assert "missing image: 1, corrupt image: 1, bad mask: 0" in captured.out


def test_missing_instances_json_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "refcoco").mkdir()
    assert main(["data", "stats", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'refcoco' / 'instances.json'}: file not found" in err
