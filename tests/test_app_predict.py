"""`lgformer predict`: outputs on real photos, and every bad input is one clear line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, bomb_png_header, save_lite_checkpoint
from PIL import Image

from lgformer.cli import main
from lgformer.predictor import Segmenter

MAN = PHOTOS / "COCO_train2014_000000460370.jpg"  # 640 x 427
BEAR = PHOTOS / "COCO_train2014_000000157714.jpg"  # 640 x 480


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_lite_checkpoint(tmp_path_factory.mktemp("lite"), "data.image_size=128")


def test_predict_writes_masks_overlays_and_summary(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    texts = ["the man texting on his phone", "white teddy bear"]
    argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(MAN), "--image", str(BEAR)]
    argv += [arg for t in texts for arg in ("--text", t)] + ["--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["checkpoint"] == str(checkpoint) and summary["image_size"] == 128
    records = summary["predictions"]
    assert [(Path(r["image"]).name, r["sentence"]) for r in records] == [
        (photo.name, text) for photo in (MAN, BEAR) for text in texts
    ]
    for record, size in zip(records, [(640, 427)] * 2 + [(640, 480)] * 2):
        mask = Image.open(out / record["mask"])
        assert mask.mode == "L" and mask.size == size
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255} and int((values > 0).sum()) == record["area"]
        assert Image.open(out / record["overlay"]).size == size
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["predictions.json"] + [r[k] for r in records for k in ("mask", "overlay")]
    )  # nothing else: no temporary files left behind
    assert "wrote 4 masks and overlays" in capsys.readouterr().out


def test_dtype_takes_the_short_and_torch_names(checkpoint, tmp_path, capsys, monkeypatch):
    masks, dtypes = {}, []
    build = Segmenter.from_pretrained

    def recording(*args, **kwargs) -> Segmenter:
        seg = build(*args, **kwargs)
        dtypes.append(seg.dtype)
        return seg

    monkeypatch.setattr(Segmenter, "from_pretrained", recording)
    for name in ("bf16", "bfloat16"):
        out = tmp_path / name
        argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(MAN), "--text", "the man texting"]
        assert main([*argv, "--dtype", name, "--device", "cpu", "--out", str(out)]) == 0
        masks[name] = np.asarray(
            Image.open(out / json.loads((out / "predictions.json").read_text())["predictions"][0]["mask"])
        )
    assert np.array_equal(masks["bf16"], masks["bfloat16"]) and dtypes == [torch.bfloat16] * 2
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "--image", str(MAN), "--text", "a man", "--dtype", "int8"])
    assert (
        exit_.value.code == 2
        and "--dtype: invalid choice: 'int8' (choose from 'fp32', 'bf16', 'fp16')" in capsys.readouterr().err
    )


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    text_jpg = tmp_path / "notes.jpg"
    text_jpg.write_text("this is a text file with a .jpg name\n")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(MAN.read_bytes()[:20000])
    tiny = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(tiny)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png_header())
    return {
        "missing": (["--image", str(tmp_path / "nope.jpg"), "--text", "a man"], "image not found"),
        "text file": (["--image", str(text_jpg), "--text", "a man"], "notes.jpg: cannot decode image"),
        "truncated": (["--image", str(truncated), "--text", "a man"], "cut.jpg: cannot decode image"),
        "1x1": (["--image", str(tiny), "--text", "a man"], "1x1 image is too small"),
        "bomb": (["--image", str(bomb), "--text", "a man"], "decompression bomb"),
        "empty": (["--image", str(MAN), "--text", ""], "empty expression"),
        "blank": (["--image", str(MAN), "--text", "  \t"], "empty expression"),
        "emoji only": (["--image", str(MAN), "--text", "🙂🚗"], "no word the model knows"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "text file", "truncated", "1x1", "bomb", "empty", "blank", "emoji only"]
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(checkpoint, tmp_path, capsys, case):
    args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lgformer predict: error: ") and message in err
    assert not out.exists()


def test_long_and_non_ascii_expressions_warn_and_succeed(checkpoint, tmp_path, capsys):
    long = " ".join(["word"] * 500)
    argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(MAN), "--out", str(tmp_path / "o")]
    argv += ["--text", long, "--text", "le café à gauche 🚗", "--device", "cpu"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (
        "warning: expression 'word word" in err and "reads only the first 20, i.e. the first 19 of 500" in err
    )
    assert "'🚗' not in the model's vocabulary" in err
    assert len(json.loads((tmp_path / "o" / "predictions.json").read_text())["predictions"]) == 2


def test_missing_default_model_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    from lgformer import shipped

    monkeypatch.setitem(shipped.SHIPPED, "lite", tmp_path / "absent")
    assert main(["predict", "--image", str(MAN), "--text", "a man", "--out", str(tmp_path / "o")]) == 2
    assert "lgformer demo --train" in capsys.readouterr().err
