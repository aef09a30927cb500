"""The custom JSONL format: the three mask forms load; bad lines give one-line errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgformer.cli import main
from lgformer.data import DataConfig, build_dataset
from lgformer.data.masks import encode_rle
from lgformer.data.sources import load_jsonl, referent_mask
from lgformer.errors import LGFormerError


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (90, 120, 150)).save(tmp_path / "img.jpg")
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 10:30] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    Image.new("L", (20, 20)).save(tmp_path / "small_mask.png")
    np.save(tmp_path / "mask.npy", mask)
    return tmp_path


def record(**changes) -> dict:
    base = {
        "image": "img.jpg",
        "mask": "mask.png",
        "sentences": ["the box", "upper box"],
        "split": "train",
        "id": "a",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def write(folder: Path, records: list[dict], name: str = "data.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_png_rle_and_polygon_masks_agree(folder: Path) -> None:
    mask = np.load(folder / "mask.npy")
    polygon = [10, 5, 30, 5, 30, 15, 10, 15]  # pixel centres inside [10, 30) x [5, 15)
    records = [
        record(id="png"),
        record(id="rle", mask={"rle": encode_rle(mask)}),
        record(id="poly", mask={"polygons": [polygon]}, split="val", level=2),
    ]
    referents = load_jsonl(write(folder, records))
    assert [r.ref_id for r in referents] == ["png", "rle", "poly"]
    for ref in referents[:2]:
        assert np.array_equal(referent_mask(ref, "exactly_one"), mask)
    poly_mask = referent_mask(referents[2], "union")
    assert (poly_mask & mask).sum() / (poly_mask | mask).sum() > 0.8
    assert referents[2].level == 2 and referents[2].sentences[1].sent_id == "poly:1"
    dataset = build_dataset(
        DataConfig(root=str(folder / "data.jsonl"), dataset="jsonl", image_size=32), "train", False
    )
    assert len(dataset) == 4 and dataset[0]["mask"].shape == (32, 32) and dataset[0]["ref_id"] == "png"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"mask": "small_mask.png"}, "field 'mask': .*small_mask.png is 20x20, the image is 40x30"),
        (
            {"mask": {"rle": {"size": [20, 20], "counts": "PP"}}},
            "field 'mask': RLE size \\[20, 20\\] differs",
        ),
        ({"sentences": ["fine", " "]}, "field 'sentences': sentence 1 is empty"),
        ({"sentences": []}, "field 'sentences': expected a non-empty list"),
        ({"image": "nope.jpg"}, "field 'image': file not found: .*nope.jpg"),
        ({"split": None}, "missing field 'split'"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"level": 7}, "field 'level': expected an integer 0-4"),
        ({"mask": {"polygons": [[1, 2, 3]]}}, "field 'mask': polygons must be flat lists"),
    ],
)
def test_bad_lines_name_file_line_and_field(folder: Path, changes: dict, expected: str) -> None:
    path = write(folder, [record(id="ok"), record(id="bad", **changes)])
    with pytest.raises(LGFormerError, match=f"^{path}:2: {expected}") as exc:
        load_jsonl(path)
    assert "\n" not in str(exc.value)


def test_duplicate_ids_and_invalid_json(folder: Path) -> None:
    with pytest.raises(LGFormerError, match=r"data.jsonl:2: field 'id': 'a' already used on line 1"):
        load_jsonl(write(folder, [record(), record()]))
    path = folder / "broken.jsonl"
    path.write_text(json.dumps(record()) + "\n\n{not json\n")
    with pytest.raises(LGFormerError, match=r"broken.jsonl:3: not valid JSON"):
        load_jsonl(path)


def test_cli_prints_one_line_and_exits_2(folder: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(folder, [record(mask="small_mask.png")])
    code = main(["data", "stats", "--root", str(path), "--dataset", "jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"lgformer data: error: {path}:1: field 'mask'")
