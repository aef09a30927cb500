"""`lgformer demo --train`: retrains from scratch with the engine's trainer (a tiny run here), stores the
result like the shipped model (fp16, without the frozen MiniLM) and runs the demo on it."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from lgformer.cli import main


def test_demo_train_retrains_stores_fp16_and_runs_the_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--train", "--out", str(out), "--steps", "2", "--train-refs", "6", "--val-refs", "3"]
    argv += ["--eval-refs", "4", "--scenes", "1", "--device", "cpu", "--workers", "1"]
    argv += ["--set", "data.image_size=64", "--set", "train.batch_size=2", "--set", "train.workers=0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    model = out / "train" / "model"
    assert f"retrained model: {model}" in printed and "held-out synthetic split" in printed

    weights = load_file(model / "model.safetensors")
    assert weights and all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    assert not any(k.startswith("text_encoder.") for k in weights)
    meta = json.loads((model / "config.json").read_text())
    assert meta["weights_exclude"] == ["text_encoder."] and meta["step"] == 2
    assert meta["config"]["data"]["dataset"] == "synth" and meta["config"]["train"]["max_steps"] == 2
    assert (out / "train" / "run" / "log.jsonl").is_file() and (out / "gallery.png").is_file()
