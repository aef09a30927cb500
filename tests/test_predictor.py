"""The Python API: `Segmenter` on real photos, batching, input types, and every bad input of issue 5."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, bomb_png_header
from PIL import Image

from lgformer import config as config_mod
from lgformer import shipped
from lgformer.checkpoint import save_model
from lgformer.errors import LGFormerError
from lgformer.model.build import build_model
from lgformer.predictor import InputWarning, Segmenter

PHOTO = PHOTOS / "COCO_train2014_000000460370.jpg"  # 640 x 427, "man texting"


@pytest.fixture(scope="module")
def lite():
    """The lite network (pretrained encoders, untrained heads drawn from seed 0: fine for mechanics), run
    at 128 px."""
    torch.manual_seed(0)
    cfg = config_mod.load("lite", ["data.image_size=128"])
    return build_model(cfg.model, pretrained=True).eval(), cfg


@pytest.fixture(scope="module")
def seg(lite):
    return Segmenter(*lite, torch.device("cpu"))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.jpg").write_text("not an image, just text\n")
    data = PHOTO.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "tiny.png")
    (folder / "bomb.png").write_bytes(bomb_png_header())
    return {p.stem: p for p in folder.iterdir()}


def test_predict_real_photo_gives_mask_at_original_size(seg):
    result = seg.predict(PHOTO, "the man on the left texting on his phone")
    assert result.mask.shape == (427, 640) and result.mask.dtype == bool
    assert result.probability.shape == (427, 640) and result.probability.dtype == np.float32
    assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
    # the mask is logit > 0: probability > 0.5, but for pixels whose sigmoid rounds to 0.5 in float32
    differ = result.mask != (result.probability > 0.5)
    assert np.all(np.abs(result.probability[differ] - 0.5) < 1e-6)
    assert 0 < result.mask.sum() < result.mask.size  # seed 0's untrained heads: neither empty nor full
    x, y, w, h = result.bbox
    ys, xs = np.nonzero(result.mask)
    assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    assert result.score == pytest.approx(float(result.probability[result.mask].mean()))
    # nothing over the threshold (measured: the largest probability is 0.935): no box, score 0
    threshold = (1.0 + float(result.probability.max())) / 2
    empty = seg.predict(PHOTO, "the man on the left texting on his phone", threshold=threshold)
    assert not empty.mask.any() and empty.bbox is None and empty.score == 0.0


def test_list_of_sentences_matches_one_by_one(seg):
    sentences = ["man texting", "the train on the right", "a black bag"]
    batched = seg.predict(PHOTO, sentences, batch_size=2)  # two batches, one of them partial
    assert [r.sentence for r in batched] == sentences
    for sentence, together in zip(sentences, batched):
        alone = seg.predict(PHOTO, sentence)
        assert np.abs(together.probability - alone.probability).max() < 1e-5
        # Batched and single matrix products round differently in the last bits: masks can only disagree
        # on pixels whose probability is 0.5 to within that rounding.
        differ = together.mask != alone.mask
        assert np.all(np.abs(alone.probability[differ] - 0.5) < 1e-5)


def test_path_pil_and_array_inputs_agree(seg):
    picture = Image.open(PHOTO)
    by_path = seg.predict(PHOTO, "man texting")
    by_pil = seg.predict(picture, "man texting")
    by_array = seg.predict(np.asarray(picture.convert("RGB")), "man texting")
    assert np.array_equal(by_path.probability, by_pil.probability)
    assert np.array_equal(by_path.probability, by_array.probability)
    grey = seg.predict(picture.convert("L"), "man texting")  # any PIL mode is decoded to RGB
    grey_rgb = seg.predict(np.asarray(picture.convert("L").convert("RGB")), "man texting")
    assert grey.mask.shape == (427, 640) and np.array_equal(grey.probability, grey_rgb.probability)


def test_threshold_is_on_the_probability(seg):
    low = seg.predict(PHOTO, "man texting", threshold=0.2)
    high = seg.predict(PHOTO, "man texting", threshold=0.8)
    assert np.all(high.mask <= low.mask)
    assert np.array_equal(high.mask, high.probability > 0.8)
    with pytest.raises(LGFormerError, match="threshold"):
        seg.predict(PHOTO, "man texting", threshold=1.0)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing", "image not found"),
        ("text", "cannot decode image"),
        ("truncated", "cannot decode image"),
        ("tiny", "1x1 image is too small"),
        ("bomb", "decompression bomb"),
    ],
)
def test_bad_images_are_named_errors(seg, bad_files, name, message):
    path = bad_files.get(name, bad_files["text"].parent / "missing.jpg")
    with pytest.raises(LGFormerError, match=message) as info:
        seg.predict(path, "man texting")
    assert path.name in str(info.value) and "\n" not in str(info.value)


def test_bad_arrays_are_refused(seg):
    with pytest.raises(LGFormerError, match="H x W x 3 uint8"):
        seg.predict(np.zeros((64, 64), dtype=np.float32), "man texting")
    with pytest.raises(LGFormerError, match="path, PIL image or numpy array"):
        seg.predict(b"bytes", "man texting")


@pytest.mark.parametrize(
    ("sentence", "message"),
    [("", "empty expression"), ("   \t ", "empty expression"), ("🚗🚕🙂", "no word the model knows")],
)
def test_unusable_sentences_are_errors(seg, sentence, message):
    with pytest.raises(LGFormerError, match=message):
        seg.predict(PHOTO, sentence)
    with pytest.raises(LGFormerError, match=message):
        seg.predict(PHOTO, ["man texting", sentence])


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        (5, {}, "text: expected an expression or a list of them, got int"),
        (None, {}, "text: expected an expression or a list of them, got NoneType"),
        ([], {}, "give one or more expressions"),
        (["man texting", 5], {}, "expression 5: expected a string, got int"),
        (["man texting"] * 3, {"batch_size": 0}, "batch_size 0 must be a whole number >= 1"),
        (["man texting"] * 3, {"batch_size": -1}, "batch_size -1 must be"),  # gave [] before
        (["man texting"] * 3, {"batch_size": 2.0}, "batch_size 2.0 must be"),
    ],
)
def test_bad_text_and_batch_size_are_errors(seg, text, options, message):
    with pytest.raises(LGFormerError, match=message):
        seg.predict(PHOTO, text, **options)


def test_any_iterable_of_sentences_is_a_list(seg):
    together = seg.predict(PHOTO, ["man texting", "a black bag"])
    for sentences in (("man texting", "a black bag"), iter(["man texting", "a black bag"])):
        got = seg.predict(PHOTO, sentences)
        assert [r.sentence for r in got] == ["man texting", "a black bag"]
        assert all(np.array_equal(a.probability, b.probability) for a, b in zip(got, together))


def test_partly_readable_sentences_warn_and_still_predict(seg):
    long = " ".join(("the tall man in the dark coat " * 72).split()[:500])  # 500 words, one token each
    with pytest.warns(
        InputWarning, match=r"502 tokens long; .* reads only the first 20, i.e. the first 19 of 500"
    ):
        result = seg.predict(PHOTO, long)
    assert result.mask.shape == (427, 640)
    with pytest.warns(InputWarning, match="'🚗' not in the model's vocabulary"):
        seg.predict(PHOTO, "the man next to the 🚗")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        accented = seg.predict(PHOTO, "l'homme à gauche, café crème")  # accents are stripped, not unknown
    assert accented.mask.shape == (427, 640)


def test_from_pretrained_folder_shipped_name_and_presets(tmp_path, lite, monkeypatch):
    model, cfg = lite
    save_model(tmp_path / "ckpt", model, cfg, exclude=("text_encoder.",))
    seg = Segmenter.from_pretrained(tmp_path / "ckpt", device="cpu", overrides=["data.image_size=96"])
    assert seg.image_size == 96 and seg.predict(PHOTO, "man texting").mask.shape == (427, 640)
    monkeypatch.setitem(shipped.SHIPPED, "lite", tmp_path / "not-installed")
    with pytest.raises(LGFormerError, match=r"default 'lite' model is not installed .*lgformer demo --train"):
        Segmenter.from_pretrained("lite")
    with pytest.raises(LGFormerError, match="ships no weights.*convert official"):
        Segmenter.from_pretrained("official-swin-b")
    with pytest.raises(LGFormerError, match="neither a folder nor a shipped model"):
        Segmenter.from_pretrained(tmp_path / "nowhere")
    for name in ("fp16", "float16"):
        with pytest.raises(LGFormerError, match=f"dtype '{name}' needs a GPU; on CPU use bf16 or fp32"):
            Segmenter.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=name)
    with pytest.raises(LGFormerError, match=r"dtype 'int8'; valid: fp32, bf16, fp16 \(or float32, bfloat16"):
        Segmenter.from_pretrained(tmp_path / "ckpt", device="cpu", dtype="int8")


def test_bfloat16_autocast_runs(seg, lite):
    """bf16 autocast gives fp32 probabilities near fp32's (measured: at most 0.004 apart, 99.7–99.8% of the
    mask's pixels the same), yet not the same ones: the bf16 path ran."""
    result = Segmenter(*lite, torch.device("cpu"), torch.bfloat16).predict(PHOTO, "man texting")
    assert result.mask.shape == (427, 640) and result.probability.dtype == np.float32
    fp32 = seg.predict(PHOTO, "man texting")
    assert 0 < np.abs(result.probability - fp32.probability).max() < 0.05
    assert (result.mask == fp32.mask).mean() >= 0.98


def test_import_lgformer_stays_light():
    code = "import sys, lgformer; assert 'torch' not in sys.modules; print(lgformer.Segmenter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "Segmenter"
