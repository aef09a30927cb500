"""Fidelity with the authors' network: golden forward pass, tensor layout, checkpoint safety."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
from conftest import OFFICIAL

from lgformer import config as config_mod
from lgformer.checkpoint import load_model
from lgformer.cli import main
from lgformer.convert.official import from_official, infer_preset, load_official_checkpoint, to_official
from lgformer.convert.verify import build_recipe_model
from lgformer.errors import LGFormerError
from lgformer.model.build import build_model

GOLDEN = OFFICIAL / "golden_tiny_w7_224.safetensors"


def _keys_tsv(name: str) -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in (OFFICIAL / name).read_text().splitlines():
        if not line.strip() or line.startswith("key\t"):
            continue
        key, shape, _kind = line.split("\t")
        rows[key] = tuple(int(s) for s in shape.strip("()[] ").split(",") if s.strip())
    return rows


def test_verify_official_golden_passes(capsys):
    """On the CPU (`--device auto` takes the GPU where there is one), in fp32 proper: TF32 is off while it
    runs and the user's settings are back afterwards."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert main(["verify-official", str(GOLDEN), "--variant", "tiny-w7", "--device", "cpu"]) == 0
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in out[:-1]] == [f"logits_{i}" for i in range(7)]
    assert out[-1].startswith("max_abs_diff=") and float(out[-1].split("=")[1]) <= 1e-4


@pytest.mark.parametrize(
    ("preset", "window", "tsv"),
    [
        ("official-swin-t", 7, "official_tiny_w7_keys.tsv"),
        ("official-swin-b", 12, "official_base_w12_keys.tsv"),
    ],
)
def test_to_official_matches_the_authors_layout(preset, window, tsv):
    cfg = config_mod.preset(preset).model
    cfg.window = window
    model = build_model(cfg, pretrained=False)
    ours = {
        k: tuple(v.shape)
        for k, v in to_official(model.state_dict()).items()
        if not k.startswith("text_encoder.")
    }
    assert ours == _keys_tsv(tsv)


def test_official_round_trip_is_identity():
    model = build_recipe_model("tiny-w7")
    state = model.state_dict()
    back = from_official(to_official(state), model)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def tiny_official_state() -> dict[str, torch.Tensor]:
    return to_official(build_recipe_model("tiny-w7").state_dict())


def test_bad_checkpoints_are_named(tiny_official_state):
    model = build_recipe_model("tiny-w7")
    missing = dict(tiny_official_state)
    del missing["classifier.txt_proj.bias"]
    with pytest.raises(LGFormerError, match="missing: classifier.txt_proj.bias"):
        from_official(missing, model)
    extra = {**tiny_official_state, "classifier.extra.weight": torch.zeros(3)}
    with pytest.raises(LGFormerError, match="unexpected: classifier.extra.weight"):
        from_official(extra, model)
    wrong = {**tiny_official_state, "classifier.txt_proj.bias": torch.zeros(5)}
    with pytest.raises(LGFormerError, match=r"wrong shape: classifier.txt_proj.bias \(5,\)"):
        from_official(wrong, model)


def test_convert_official_checkpoint_end_to_end(tmp_path, tiny_official_state):
    path = tmp_path / "lgformer_refcoco.pth"
    args = argparse.Namespace(swin_type="tiny", window12=False, lr=5e-5)
    torch.save({"model": tiny_official_state, "args": args, "epoch": 39, "optimizer": {"state": {}}}, path)
    assert infer_preset(tiny_official_state) == ("official-swin-t", 7)
    assert main(["convert", "official", str(path), "--out", str(tmp_path / "ours")]) == 0
    model, cfg = load_model(tmp_path / "ours")
    assert cfg.preset == "official-swin-t" and cfg.model.window == 7
    back = to_official(model.state_dict())
    assert back.keys() == tiny_official_state.keys()
    assert all(torch.equal(back[k], tiny_official_state[k]) for k in back)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"x": _Evil()}}, fh)
    with pytest.raises(LGFormerError, match="refused"):
        load_official_checkpoint(path)
    assert main(["convert", "official", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "pwned_by_pickle").exists()
    assert not (tmp_path / "o").exists()


def test_missing_paths_give_one_line_errors(tmp_path, capsys):
    assert main(["convert", "official", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.pth not found" in err
    assert main(["verify-official", str(tmp_path / "g.safetensors"), "--variant", "tiny-w7"]) == 2
    assert "not found" in capsys.readouterr().err


def test_verify_official_any_batch_size_and_partial_golden(tmp_path, capsys):
    """Golden files may hold any batch, any (padded) size and only some outputs: build one from the
    recipe model itself (window 7 on 100x68 needs padding at every stage) and check the CLI path."""
    from safetensors.torch import save_file

    model = build_recipe_model("tiny-w7")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 100, 68, generator=g)
    words = torch.randn(2, 20, 768, generator=g)
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0, :20], mask[1, :5] = 1, 1
    with torch.no_grad():
        logits = model(image, mask, text_features=words)
    golden = tmp_path / "golden.safetensors"
    save_file(
        {
            "image": image,
            "text_features": words,
            "text_mask": mask,
            "logits_3": logits[:, 3:4].contiguous(),
            "logits_6": logits[:, 6:7].contiguous(),
        },
        golden,
    )
    assert main(["verify-official", str(golden), "--variant", "tiny-w7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["logits_3", "logits_6"]
    save_file(
        {
            "image": image,
            "text_features": words,
            "text_mask": mask,
            "logits_6": (logits[:, 6:7] + 1e-3).contiguous(),
        },
        golden,
    )
    assert main(["verify-official", str(golden), "--variant", "tiny-w7"]) == 1
