"""Masks land where they must on a real, non-square photo, through every way a mask leaves the package.

No trained model is needed: the network is `LGFormer` composed (by injection, as SAM composes `Sam`) of boxes
whose output is known by construction. Its image encoder marks where the photo is painted in one colour,
the pixel decoder passes that map on as the 1/4-scale mask features, the generator's prototype is the first
word, and the real `MaskHead` is set to a constant kernel, so the logit map says "painted" at 1/4 scale. We
paint a large object and a thin one against the right edge onto a 640 x 427 COCO photo; the expected mask is
exactly the painted pixels at the photo's own size. A mask flipped, transposed, shifted, squashed or
un-resized wrongly by `Segmenter.predict`, `lgformer predict`, the ONNX graph or `lgformer eval --protocol
original` misses it (each check is shown to fail on a flipped and a transposed mask).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTOS
from PIL import Image
from torch import nn

from lgformer import config as config_mod
from lgformer.cli import main
from lgformer.data.images import image_tensor, load_image
from lgformer.model.common import IMAGENET_MEAN, IMAGENET_STD
from lgformer.model.head import MaskHead
from lgformer.model.lgformer import LGFormer
from lgformer.model.text_encoder import TextEncoder
from lgformer.predictor import Segmenter

PHOTO = PHOTOS / "COCO_train2014_000000460370.jpg"  # 640 x 427
PAINT = (255, 0, 255)
SIZE = 640  # the network's input side: the 1/4-scale map has 160 x 160 cells of 4 x 2.7 photo pixels
SENTENCE = "the painted thing"


class PaintEncoder(nn.Module):
    """Image encoder box: the fraction of each 4 x 4 cell painted in PAINT, (B,3,S,S) -> [(B,1,S/4,S/4)]."""

    def forward(
        self, image: torch.Tensor, text_features: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        rgb = image * std + mean
        paint = torch.tensor(PAINT, dtype=torch.float32).view(1, 3, 1, 1) / 255
        painted = ((rgb - paint).abs().amax(1, keepdim=True) < 0.25).float()
        return [F.avg_pool2d(painted, 4)], text_features


class PassDecoder(nn.Module):
    """Pixel decoder box: the encoder's map is the mask features."""

    def forward(self, feats: list[torch.Tensor], words: torch.Tensor, text_mask: torch.Tensor):
        return feats[0], []


class FirstWord(nn.Module):
    """Prototype generator box: one prototype, the first word's features."""

    def forward(self, words: torch.Tensor, text_mask: torch.Tensor, ms_feats: list) -> list[torch.Tensor]:
        return [words[:, :1]]


def paint_model() -> tuple[LGFormer, config_mod.Config]:
    """`LGFormer` of the three boxes above, the lite text encoder and a `MaskHead` on one mask channel whose
    kernel is constant: logit = 16 * painted - 8."""
    cfg = config_mod.load("lite", [f"data.image_size={SIZE}"])
    text = TextEncoder.build(cfg.model.text_encoder, pretrained=False)
    head = MaskHead(text.dim, 1)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.copy_(torch.tensor([16.0, -8.0]))
    model = LGFormer(PaintEncoder(), text, PassDecoder(), FirstWord(), head)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def painted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The photo with a large object and a 12-pixel-wide bar near its right edge painted, and their mask."""
    photo = np.array(load_image(PHOTO))
    assert photo.shape == (427, 640, 3)
    mask = np.zeros(photo.shape[:2], dtype=bool)
    mask[60:330, 90:430] = True
    mask[30:400, 618:630] = True
    photo[mask] = PAINT
    path = tmp_path_factory.mktemp("painted") / "painted.png"
    Image.fromarray(photo).save(path)
    return path, mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def assert_where_painted(mask: np.ndarray, expected: np.ndarray) -> None:
    """The mask is the painted pixels at the photo's size: IoU >= 0.99 overall, >= 0.95 on the thin bar."""
    assert mask.shape == expected.shape and mask.dtype == bool
    assert iou(mask, expected) >= 0.99, iou(mask, expected)
    bar = (slice(None), slice(600, None))
    assert iou(mask[bar], expected[bar]) >= 0.95, iou(mask[bar], expected[bar])


class Broken(nn.Module):
    """The model with a geometry bug in its output: logits flipped left-right or transposed."""

    def __init__(self, model: nn.Module, bug: str) -> None:
        super().__init__()
        self.model, self.bug = model, bug

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, target = self.model(*args, **kwargs)  # Segmenter asks for the no-target logit too
        return (logits.flip(-1) if self.bug == "flip" else logits.transpose(-2, -1)), target


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder of the paint model (its config and head; loading it is patched to the boxes)."""
    from lgformer.checkpoint import save_model

    model, cfg = paint_model()
    return save_model(tmp_path_factory.mktemp("ckpt") / "paint", model, cfg)


@pytest.fixture()
def loads_paint_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command that loads a checkpoint gets the paint model (`load_model` builds the real boxes)."""
    for where in ("lgformer.checkpoint.load_model", "lgformer.predictor.load_model"):
        monkeypatch.setattr(where, lambda *args, **kwargs: paint_model())


def test_segmenter_puts_the_mask_where_it_must_be(painted):
    path, expected = painted
    result = Segmenter(*paint_model(), torch.device("cpu")).predict(path, SENTENCE)
    assert_where_painted(result.mask, expected)


@pytest.mark.parametrize("bug", ["flip", "transpose"])
def test_the_check_fails_on_a_flipped_or_transposed_mask(painted, bug):
    path, expected = painted
    model, cfg = paint_model()
    result = Segmenter(Broken(model, bug), cfg, torch.device("cpu")).predict(path, SENTENCE)
    with pytest.raises(AssertionError):
        assert_where_painted(result.mask, expected)


def test_lgformer_predict_writes_the_mask_where_it_must_be(painted, checkpoint, loads_paint_model, tmp_path):
    path, expected = painted
    argv = ["predict", "--checkpoint", str(checkpoint), "--image", str(path), "--text", SENTENCE]
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    (record,) = summary["predictions"]
    mask = np.array(Image.open(tmp_path / "out" / record["mask"])) > 127
    assert_where_painted(mask, expected)
    ys, xs = np.nonzero(mask)
    assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_eval_original_protocol_scores_the_mask_where_it_must_be(
    painted, checkpoint, loads_paint_model, tmp_path, capsys
):
    path, expected = painted
    Image.fromarray(expected.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    record = {"image": str(path), "mask": "mask.png", "sentences": [SENTENCE], "split": "test", "id": "p"}
    (tmp_path / "painted.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["eval", "--checkpoint", str(checkpoint), "--root", str(tmp_path / "painted.jsonl")]
    argv += ["--split", "test", "--protocol", "original", "--json", "--device", "cpu"]
    assert main([*argv, "--save-masks", str(tmp_path / "masks")]) == 0
    assert json.loads(capsys.readouterr().out)["oIoU"] >= 99.0
    (saved,) = (tmp_path / "masks").glob("*.png")
    assert_where_painted(np.array(Image.open(saved)) > 127, expected)


def test_onnx_graph_puts_the_mask_where_it_must_be(painted, tmp_path):
    """The graph's (S, S) logits, resized to the photo bilinearly as the README says, are the painted mask."""
    import onnxruntime

    from lgformer.convert.onnx import export_onnx
    from lgformer.text.tokenizer import Tokenizer

    path, expected = painted
    model, cfg = paint_model()
    picture = load_image(path)
    export_onnx(model, cfg, tmp_path / "paint.onnx", picture, SENTENCE)
    session = onnxruntime.InferenceSession(str(tmp_path / "paint.onnx"), providers=["CPUExecutionProvider"])
    ids, attention = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)([SENTENCE])
    inputs = {"image": image_tensor(picture, SIZE)[None].numpy(), "ids": ids.numpy()}
    (logits,) = session.run(None, {**inputs, "attention_mask": attention.numpy()})
    full = F.interpolate(torch.from_numpy(logits)[:, None], size=expected.shape, mode="bilinear")
    assert_where_painted(full[0, 0].numpy() > 0, expected)
