"""torchrun on CPU (gloo): 2 ranks train to the same weights as one process with the same global batch, and
evaluate to the same metrics as one rank.

The one-process reference takes the global batch of 2 as 2 accumulated micro-batches of 1, exactly the
per-rank work of the 2-rank run, and every process runs one thread: each micro-batch is then computed
identically and only the gradient sum differs in association, so the weights agree to rounding. (A batch
of 2 in one forward pass rounds differently, and Adam turns the rounding noise of parameters whose gradient
is mathematically zero, e.g. biases before an instance norm, into updates of ~lr.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MINI
from safetensors.torch import load_file

OVERRIDES = [
    f"data.root={MINI}", "data.dataset=refcoco", "data.split_by=unc", "train.train_split=val",
    "data.image_size=64", "train.batch_size=2", "train.max_steps=3", "train.warmup_steps=0",
    "train.val_every=2", "train.workers=0", "train.pretrained=false", "train.deterministic=true",
    "train.log_every=1", "model.decoder_layers=1", "model.generator_layers=1",
]  # fmt: skip
CONFIG = ["--config", "lite", *(arg for item in OVERRIDES for arg in ("--set", item))]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _lgformer(args: list[str], ranks: int = 1) -> str:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    )
    cmd = [sys.executable, *launcher, "-m", "lgformer.cli", *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _lgformer(["train", *CONFIG, "--set", "train.device_batch=1", "--out", str(root / "single")])
    out = _lgformer(["train", *CONFIG, "--out", str(root / "ddp")], ranks=2)
    assert "global batch 2 = 1 per device x 2 process(es) x 1 accumulation step(s)" in out
    return root


def test_two_ranks_train_to_the_weights_of_one_process(runs):
    single = load_file(runs / "single" / "last" / "model.safetensors")
    ddp = load_file(runs / "ddp" / "last" / "model.safetensors")
    assert single.keys() == ddp.keys()
    step2 = load_file(runs / "ddp" / "best" / "model.safetensors")  # saved at the validation of step 2
    assert max((single[k] - step2[k]).abs().max().item() for k in single) > 1e-4  # step 3 moved the weights
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert worst <= 1e-5
    vals = [
        [
            json.loads(line)["val"]
            for line in (runs / r / "log.jsonl").read_text().splitlines()
            if '"val"' in line
        ]
        for r in ("single", "ddp")
    ]
    assert len(vals[0]) == 2 and vals[0] == vals[1]  # validation under 2 ranks == under 1


def test_two_ranks_evaluate_to_the_metrics_of_one(runs, tmp_path):
    args = [
        "eval",
        "--checkpoint",
        str(runs / "ddp" / "last"),
        "--split",
        "val",
        "--json",
        "--batch-size",
        "1",
        "--workers",
        "0",
    ]
    one = json.loads(_lgformer(args))
    two = json.loads(_lgformer([*args, "--save-masks", str(tmp_path / "masks")], ranks=2))
    assert one == two and one["sentences"] == 9
    assert len(list((tmp_path / "masks").glob("*.png"))) == 9  # each rank wrote its share
