"""A training process killed at any point of a checkpoint save resumes to the weights of a run that was never
interrupted: checkpoints are whole folders swapped in, and `--resume` finishes or undoes a cut swap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MINI
from safetensors.torch import load_file

from lgformer.files import CRASH_ENV

OVERRIDES = [
    f"data.root={MINI}", "data.dataset=refcoco", "data.split_by=unc", "train.train_split=val",
    "data.image_size=64", "train.batch_size=2", "train.max_steps=4", "train.warmup_steps=0",
    "train.val_split=null", "train.save_every=1", "train.workers=0", "train.pretrained=false",
    "train.deterministic=true", "model.decoder_layers=1", "model.generator_layers=1",
]  # fmt: skip
CONFIG = ["--config", "lite", *(arg for item in OVERRIDES for arg in ("--set", item))]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# every point of a save where a kill lands: after the trainer state, after the weights (both inside the
# temporary folder), once the folder is written and synced, once the old `last` is moved aside, once the
# new one is in place (before the old one is removed)
STAGES = ["state-written", "weights-written", "folder-written", "folder-moved-aside", "folder-swapped"]


def _train(args: list[str], crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, CRASH_ENV: crash} if crash else ENV
    cmd = [sys.executable, "-m", "lgformer.cli", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _train([*CONFIG, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out / "last" / "model.safetensors")


@pytest.mark.parametrize("stage", STAGES)
def test_a_kill_during_a_save_resumes_to_the_uninterrupted_weights(
    straight: dict, tmp_path: Path, stage: str
) -> None:
    out = tmp_path / "run"
    killed = _train([*CONFIG, "--out", str(out)], crash=f"{stage}:2")  # during the save of step 2
    assert killed.returncode == 137, killed.stderr[-2000:]
    resumed = _train(["--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights = load_file(out / "last" / "model.safetensors")
    assert weights.keys() == straight.keys() and all((weights[k] == straight[k]).all() for k in weights)
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name.startswith(".") or name.endswith(".prev")], left
    if stage == "folder-moved-aside":  # `last` was gone: the previous checkpoint took its place, said so
        assert "interrupted while saving" in resumed.stdout + resumed.stderr
