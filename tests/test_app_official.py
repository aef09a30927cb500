"""The authors' released-checkpoint path end to end: their `.pth` layout -> `convert official` -> `predict`
on a real photo (the Swin-T variant carrying the golden-check recipe weights, run at 224 px to stay fast)."""

from __future__ import annotations

import argparse
import json

import torch
from conftest import PHOTOS
from PIL import Image

from lgformer.cli import main
from lgformer.convert.official import to_official
from lgformer.convert.verify import build_recipe_model

PHOTO = PHOTOS / "COCO_train2014_000000363252.jpg"


def test_authors_checkpoint_converts_and_predicts_on_a_photo(tmp_path, capsys):
    pth = tmp_path / "lgformer_refcoco.pth"
    state = to_official(build_recipe_model("tiny-w7").state_dict())
    args = argparse.Namespace(swin_type="tiny", window12=False, img_size=480)
    torch.save({"model": state, "args": args, "epoch": 39}, pth)
    assert main(["convert", "official", str(pth), "--out", str(tmp_path / "ours")]) == 0

    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(tmp_path / "ours"), "--image", str(PHOTO), "--out", str(out)]
    argv += ["--text", "the man with sunglasses", "--set", "data.image_size=224", "--device", "cpu"]
    assert main(argv) == 0
    record = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert Image.open(out / record["mask"]).size == (375, 500)  # the photo's own size
    assert Image.open(out / record["overlay"]).size == (375, 500)
    assert "wrote 1 masks and overlays" in capsys.readouterr().out
