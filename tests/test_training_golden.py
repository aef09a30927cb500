"""The training golden: the authors' recorded training steps, taken by our own training code, pass the
README's checks (one process, two processes under torchrun, accumulation), and a recipe broken on purpose
fails the check made to catch it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from safetensors.torch import save_file

import lgformer.engine.train as train_mod
from lgformer.cli import main
from lgformer.convert.verify_training import compare, read_golden

GOLDEN = SHARED / "reference" / "official-training" / "golden_train_tiny_w7_224.safetensors"
VERIFY = ["verify-official-training", str(GOLDEN), "--variant", "tiny-w7"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CHECKS = 19  # lines a full run prints before `training_golden=`


def verdicts(out: str) -> dict[str, str]:
    """check name -> PASS | FAIL, from the printed check lines."""
    return {line.split(":")[0]: line.rsplit(" ", 1)[1] for line in out.splitlines() if " (tolerance " in line}


def test_our_training_code_takes_the_authors_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    written = tmp_path / "ours.safetensors"
    code = main([*VERIFY, "--write", str(written)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().endswith("training_golden=PASS")
    assert list(verdicts(out).values()) == ["PASS"] * CHECKS
    # what --write stores is in the golden's own format: read back and compared, the same verdicts
    ref, ref_meta = read_golden(GOLDEN, "tiny-w7")
    ours, ours_meta = read_golden(written, "tiny-w7")
    assert all(c.passed for c in compare(ours, ours_meta, ref, ref_meta))
    assert set(ours) - set(ref) == set() and ours["lr"].shape == ref["lr"].shape


def _subprocess(args: list[str], ranks: int = 1) -> str:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    )
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "lgformer.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("ranks", [2, 1], ids=["ddp-2-ranks-batch-1", "accumulate-2-of-batch-1"])
def test_the_same_global_batch_is_the_same_recipe(ranks: int) -> None:
    out = _subprocess([*VERIFY, "--device-batch", "1"], ranks=ranks)
    assert "training_golden=PASS" in out
    assert list(verdicts(out).values()) == ["PASS"] * CHECKS


def _decay_the_no_decay_group(original):
    def groups(model, tc):
        out = original(model, tc)
        for group in out:
            group["weight_decay"] = tc.weight_decay
        return out

    return groups


def _schedule_one_early(original):
    return lambda step, total, warmup, power: original(step + 1, total, warmup, power)


def _zero_grads_to_unused_gates(original):
    def freeze(model, tc):
        original(model, tc)
        gates = [model.image_encoder.vis_gates[-1], model.image_encoder.text_gates[-1]]
        for p in (p for gate in gates for p in gate.parameters()):
            p.requires_grad_(True)  # in the optimizer, with a zero gradient instead of none
            p.grad = torch.zeros_like(p)

    return freeze


def _keep_zero_grads(original):
    def update(model, optimizer, scaler, clip):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # torch 1.x's zero_grad(set_to_none=False) behaviour
        original(model, optimizer, scaler, clip)

    return update


@pytest.mark.parametrize(
    "patches, overrides, failing",
    [
        ({"param_groups": _decay_the_no_decay_group}, [], "weight decay r_0 (backbone_no_decay) step 1"),
        ({"lr_factor": _schedule_one_early}, [], "lr max rel"),
        ({}, ["train.freeze_bert_embeddings=false"], "exactly-zero-update keys"),
        (
            {"freeze": _zero_grads_to_unused_gates, "optimizer_update": _keep_zero_grads},
            [],
            "grad step 1 None set (optimized parameters)",
        ),
    ],
    ids=[
        "decay-on-no-decay-group",
        "schedule-stepped-before-step-1",
        "bert-embeddings-trained",
        "zero-grads-for-unused-gates",
    ],
)
def test_a_broken_recipe_fails_its_check(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    patches: dict,
    overrides: list[str],
    failing: str,
) -> None:
    for name, wrap in patches.items():  # the trainer's own functions, which the check calls
        monkeypatch.setattr(train_mod, name, wrap(getattr(train_mod, name)))
    sets = [arg for item in overrides for arg in ("--set", item)]
    code = main([*VERIFY, "--steps", "1", *sets])
    out = capsys.readouterr().out
    assert code == 1 and "training_golden=FAIL" in out
    assert verdicts(out)[failing] == "FAIL", out


def truncated(tmp_path: Path) -> Path:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(GOLDEN.read_bytes()[:100_000])
    return path


def missing_keys(tmp_path: Path) -> Path:
    path = tmp_path / "partial.safetensors"
    save_file({"image": torch.zeros(2, 3, 8, 8)}, str(path))
    return path


@pytest.mark.parametrize(
    "make, variant, words",
    [
        (lambda tmp: GOLDEN, "base-w12", "is not a base-w12 training golden"),
        (truncated, "tiny-w7", "cannot load the training golden"),
        (missing_keys, "tiny-w7", "missing tensor"),
        (lambda tmp: tmp / "nowhere.safetensors", "tiny-w7", "not found"),
    ],
    ids=["other-variant", "truncated", "missing-keys", "no-file"],
)
def test_bad_goldens_are_one_line_errors(tmp_path: Path, make, variant: str, words: str) -> None:
    path = make(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "lgformer.cli", "verify-official-training", str(path), "--variant", variant],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr
