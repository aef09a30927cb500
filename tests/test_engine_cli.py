"""`lgformer train` / `lgformer eval` from the command line: bad inputs give one-line errors (exit 2), and a
checkpoint's saved masks score exactly like the checkpoint itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MINI

from lgformer.cli import main

TINY = (
    f"--set data.root={MINI} --set data.dataset=refcoco --set data.split_by=unc --set train.train_split=val "
    "--set data.image_size=64 --set train.batch_size=2 --set train.max_steps=1 --set train.workers=0 "
    "--set train.pretrained=false --set train.val_split=null --set model.decoder_layers=1 "
    "--set model.generator_layers=1"
).split()
EVAL_DATA = ["--split", "val", "--workers", "0", "--json"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", "lite", *TINY, "--out", str(out)]) == 0
    return out


def _error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit status 2 and exactly one line on stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lgformer "), err
    return err


def test_unknown_preset_lists_the_valid_ones(capsys, tmp_path):
    err = _error(capsys, ["train", "--config", "swin-huge", "--out", str(tmp_path / "x")])
    assert "official-swin-b" in err and "lite" in err


def test_unknown_config_key_lists_the_valid_ones(capsys, tmp_path):
    err = _error(
        capsys, ["train", "--config", "lite", "--set", "train.lr_new=1", "--out", str(tmp_path / "x")]
    )
    assert "unknown key 'lr_new'" in err and "lr_pretrained" in err and "warmup_steps" in err


def test_override_with_a_wrong_type(capsys, tmp_path):
    err = _error(
        capsys, ["train", "--config", "lite", "--set", "train.batch_size=big", "--out", str(tmp_path / "x")]
    )
    assert "train.batch_size: expected an integer, got 'big'" in err


def test_yaml_config_with_a_wrong_key(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: lite\ntrain:\n  epoch: 3\n")
    err = _error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "x")])
    assert str(path) in err and "unknown key 'epoch'" in err and "epochs" in err


def test_data_root_without_the_dataset(capsys, tmp_path):
    err = _error(
        capsys, ["train", "--config", "lite", "--set", f"data.root={tmp_path}", "--out", str(tmp_path / "x")]
    )
    assert "instances.json" in err


def test_resume_with_the_config_of_another_preset(capsys, run):
    err = _error(capsys, ["train", "--resume", str(run), "--config", "official-swin-t"])
    assert "'lite' checkpoint" in err and "model.backbone" in err


def test_new_run_into_an_existing_run_folder(capsys, run):
    err = _error(capsys, ["train", "--config", "lite", *TINY, "--out", str(run)])
    assert f"--resume {run}" in err


def test_resume_from_a_folder_without_a_run(capsys, tmp_path):
    assert "not a checkpoint folder" in _error(capsys, ["train", "--resume", str(tmp_path)])


def test_checkpoint_whose_weights_do_not_fit_its_preset(capsys, run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").symlink_to(run / "last" / "model.safetensors")
    meta = json.loads((run / "last" / "config.json").read_text())
    meta["config"]["model"]["decoder_layers"] = 2
    (other / "config.json").write_text(json.dumps(meta))
    err = _error(capsys, ["eval", "--checkpoint", str(other), *EVAL_DATA])
    assert "weights do not fit preset 'lite'" in err and "missing: pixel_decoder." in err


def test_eval_needs_one_source(capsys, run):
    for sources in ([], ["--checkpoint", str(run / "last"), "--predictions", str(run)]):
        assert "give exactly one of --checkpoint DIR or --predictions DIR" in _error(
            capsys, ["eval", *sources, *EVAL_DATA]
        )


def test_eval_fp16_needs_a_gpu(capsys, run):
    err = _error(
        capsys, ["eval", "--checkpoint", str(run / "last"), "--device", "cpu", "--dtype", "fp16", *EVAL_DATA]
    )
    assert "dtype 'fp16' needs a GPU; on CPU use bf16 or fp32" in err


@pytest.mark.parametrize("protocol", ["resized", "original"])
def test_saved_masks_score_like_the_checkpoint(capsys, run, tmp_path, protocol):
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run / "last"), *EVAL_DATA, "--protocol", protocol]
    extra = [
        "--save-masks",
        str(tmp_path / "masks"),
        "--save-overlays",
        str(tmp_path / "overlays"),
        "--overlays",
        "2",
    ]
    assert main([*argv, *extra, "--out", str(tmp_path / "report")]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert direct["protocol"] == protocol and direct["sentences"] == 9
    assert (
        len(list((tmp_path / "masks").glob("*.png"))) == 9
        and len(list((tmp_path / "overlays").glob("*"))) == 2
    )
    assert f"Protocol: `{protocol}`" in (tmp_path / "report" / "report.md").read_text()
    data = ["--root", str(MINI), "--dataset", "refcoco", "--split-by", "unc", "--image-size", "64"]
    assert (
        main(["eval", "--predictions", str(tmp_path / "masks"), *data, *EVAL_DATA, "--protocol", protocol])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == direct


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--threads", "0"], "--threads 0: expected a whole number >= 1"),
        (["--repeat", "0"], "--repeat 0: expected a whole number >= 1"),
        (["--batch", "-2"], "--batch -2: expected a whole number >= 1"),
        (["--device", "tpu"], "valid: auto, cpu, cuda, cuda:N"),
    ],
)
def test_bench_arguments_are_checked(capsys, args, needle):
    assert needle in _error(capsys, ["bench", "--preset", "lite", *args])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a CUDA GPU")
def test_bench_on_cuda_without_a_gpu(capsys):
    assert "no CUDA GPU is visible" in _error(capsys, ["bench", "--preset", "lite", "--device", "cuda"])
