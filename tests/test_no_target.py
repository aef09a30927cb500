"""The no-target head (issue 23): off in the paper's presets, saved and loaded with its checkpoint, trained
beside the mask loss, and "nothing matches" said plainly by the Python API and `lgformer predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HEAD, PHOTOS, head_checkpoint

from lgformer import config as config_mod
from lgformer.checkpoint import load_model, save_model
from lgformer.cli import main
from lgformer.config import PRESETS, DataConfig
from lgformer.data.dataset import build_dataset, collate
from lgformer.engine.train import backward_batches
from lgformer.errors import LGFormerError
from lgformer.model.build import build_model
from lgformer.model.loss import mask_loss, target_loss
from lgformer.predictor import Segmenter
from lgformer.text.tokenizer import Tokenizer

MAN = PHOTOS / "COCO_train2014_000000460370.jpg"


def test_head_is_off_in_the_papers_presets_and_adds_only_its_own_weights() -> None:
    for name in PRESETS:
        assert config_mod.load(name).model.no_target_head is False, name
    cfg = config_mod.load("lite", list(HEAD))
    torch.manual_seed(0)
    with_head = build_model(cfg.model, pretrained=False)
    plain = build_model(config_mod.load("lite", [HEAD[0]]).model, pretrained=False)
    extra = set(with_head.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("target_head.") for k in extra)
    assert set(plain.state_dict()) <= set(with_head.state_dict()) and plain.target_head is None
    # the mask is the same computation with or without the head
    plain.load_state_dict({k: v for k, v in with_head.state_dict().items() if k in plain.state_dict()})
    x, ids, mask = (
        torch.randn(2, 3, 96, 96),
        torch.randint(1000, 2000, (2, 5)),
        torch.ones(2, 5, dtype=torch.long),
    )
    with torch.no_grad():
        logits, target = with_head.eval()(x, mask, ids=ids, with_target=True)
        assert target.shape == (2,)
        torch.testing.assert_close(logits, plain.eval()(x, mask, ids=ids), rtol=0, atol=0)
        assert plain(x, mask, ids=ids, with_target=True)[1] is None


@pytest.mark.parametrize("inputs", ["prototype", "pooled"])
def test_head_trains_beside_the_mask_loss(grefcoco_root: Path, inputs: str) -> None:
    """One backward on the gRefCOCO fixture: the head's BCE on "names anything?" joins the loss and reaches
    every head weight; the loss is the mask loss plus the weighted BCE."""
    cfg = config_mod.load("lite", [*HEAD, f"model.no_target_input={inputs}", "model.no_target_weight=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=True).eval()  # no dropout: the two forwards below are equal
    data = DataConfig(root=str(grefcoco_root), dataset="grefcoco", image_size=96)
    tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)
    dataset = build_dataset(data, "train", train=False, tokenizer=tokenizer)
    batch = collate([dataset[k] for k in (0, 3, 4)])  # one object, two objects, nothing
    assert batch["targets"].tolist() == [1, 2, 0]
    loss = backward_batches(model, iter([batch]), 1, cfg.model, torch.device("cpu"), None)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.target_head.parameters())
    with torch.no_grad():
        logits, target = model(
            batch["image"], batch["text_mask"], ids=batch["ids"], upsample=False, with_target=True
        )
        expected = mask_loss(logits, batch["mask"]) + 2 * target_loss(target, batch["targets"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert target_loss(torch.tensor([20.0, -20.0]), torch.tensor([3, 0])) < 1e-6


def test_checkpoints_with_and_without_the_head_load_and_a_mismatch_is_one_line(
    tmp_path: Path, capsys
) -> None:
    folder = head_checkpoint(tmp_path / "head", None)
    model, cfg = load_model(folder)
    assert cfg.model.no_target_head and model.target_head is not None
    with pytest.raises(LGFormerError, match=r"weights do not fit .*unexpected: target_head\."):
        load_model(folder, overrides=("model.no_target_head=false",))
    plain = tmp_path / "plain"
    cfg = config_mod.load("lite", [HEAD[0]])
    save_model(plain, build_model(cfg.model, pretrained=True), cfg, exclude=("text_encoder.",))
    assert load_model(plain)[0].target_head is None
    with pytest.raises(LGFormerError, match=r"weights do not fit .*missing: target_head\."):
        load_model(plain, overrides=("model.no_target_head=true",))
    argv = ["predict", "--checkpoint", str(plain), "--set", "model.no_target_head=true", "--image", str(MAN)]
    assert main([*argv, "--text", "a man", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing: target_head." in err and len(err.splitlines()) == 1


def test_nothing_matches_is_said_by_the_api_and_the_cli(tmp_path: Path, capsys) -> None:
    nothing = Segmenter.from_pretrained(head_checkpoint(tmp_path / "nothing", -20.0), device="cpu")
    something = Segmenter.from_pretrained(head_checkpoint(tmp_path / "something", 20.0), device="cpu")
    something.model.load_state_dict(
        nothing.model.state_dict()
        | {k: v for k, v in something.model.state_dict().items() if k.startswith("target_head.")}
    )
    said_nothing = nothing.predict(str(MAN), "the giraffe")
    assert said_nothing.no_target and not said_nothing.mask.any() and said_nothing.bbox is None
    assert said_nothing.score == 0.0 and said_nothing.target_score < 1e-6
    said_something = something.predict(str(MAN), "the giraffe")
    assert not said_something.no_target and said_something.target_score > 1 - 1e-6
    np.testing.assert_array_equal(said_something.probability, said_nothing.probability)
    np.testing.assert_array_equal(said_something.mask, said_nothing.probability > 0.5)
    # the threshold moves the decision: a no-target probability of ~1 is above any threshold in (0, 1)
    assert nothing.predict(str(MAN), "the giraffe", no_target_threshold=0.99).no_target
    with pytest.raises(LGFormerError, match="no_target_threshold 1.0 must be strictly between 0 and 1"):
        nothing.predict(str(MAN), "the giraffe", no_target_threshold=1.0)
    out = tmp_path / "out"
    argv = [
        "predict",
        "--checkpoint",
        str(tmp_path / "nothing"),
        "--image",
        str(MAN),
        "--text",
        "the giraffe",
    ]
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 0
    assert "'the giraffe' -> " in (printed := capsys.readouterr().out) and "nothing matches" in printed
    record = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert record["no_target"] is True and record["area"] == 0 and record["target_score"] == 0.0


def test_eval_of_a_model_that_answers_nothing(grefcoco_root: Path, tmp_path: Path, capsys) -> None:
    """Through `lgformer eval`: every mask empty, so every no-target sentence right (N-acc 100, gIoU 1 each)
    and every target one wrong (T-acc 0)."""
    folder = head_checkpoint(tmp_path / "nothing", -20.0)
    argv = ["eval", "--checkpoint", str(folder), "--root", str(grefcoco_root), "--dataset", "grefcoco"]
    assert main([*argv, "--split", "val", "--image-size", "64", "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["N-acc"], r["T-acc"], r["no_target"], r["target"]) == (100.0, 0.0, 1, 4)
    assert r["gIoU"] == pytest.approx(20.0) and r["cIoU"] == 0.0
    assert main([*argv, "--no-target-threshold", "1", "--json"]) == 2
    assert "--no-target-threshold 1.0: must be strictly between 0 and 1" in capsys.readouterr().err
