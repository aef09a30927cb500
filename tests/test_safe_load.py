"""`load_torch_file`: tensors load; pickle code, non-torch and truncated files are refused with a reason."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import pytest
import torch

from lgformer.errors import LGFormerError
from lgformer.safe_load import load_torch_file


def test_tensors_load_and_allowed_globals_pass(tmp_path: Path) -> None:
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    obj = load_torch_file(path, "a checkpoint", allowed_globals=[argparse.Namespace])
    assert torch.equal(obj["model"]["w"], torch.ones(2)) and obj["args"].lr == 1e-4
    with pytest.raises(LGFormerError, match="refused to run pickle code .*Namespace"):
        load_torch_file(path, "a checkpoint")  # the same file without the allowance


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("text", "not a torch.save file"),
        ("random", r"not a torch.save file \(neither a zip archive nor a pickle\)"),
        ("truncated", "corrupt or truncated torch.save file"),
        ("code", r"refused to run pickle code \(.*system"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(3), "hook": os.system}, path)
    if content == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif content == "random":  # not called pickle code, whatever opcodes the bytes happen to spell
        path.write_bytes(b"\x13" + bytes(random.Random(0).randrange(256) for _ in range(5000)))
    elif content == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LGFormerError, match=rf"^{path}: cannot load weights: {reason}"):
        load_torch_file(path, "weights")
