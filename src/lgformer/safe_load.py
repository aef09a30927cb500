"""Reading weight files with one readable refusal for whatever else a file is: `torch.save` files (the
authors' checkpoints, Swin, EfficientNet and BERT weights, our training state) without running pickle code
(`weights_only` loading), and safetensors files (our checkpoints, BERT weights, the golden file)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lgformer.errors import LGFormerError


def load_torch_file(path: str | Path, what: str, allowed_globals: Sequence[type] = ()) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; `allowed_globals` are the only extra classes a file
    may name. Any failure (a pickle global, not a torch file, a truncated one) raises LGFormerError."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise LGFormerError(f"{path}: cannot load {what}: {exc.strerror or exc}") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # a zip archive, or a legacy pickle's PROTO opcode
        raise LGFormerError(
            f"{path}: cannot load {what}: not a torch.save file (neither a zip archive nor a pickle)"
        )
    try:
        with torch.serialization.safe_globals(list(allowed_globals)), warnings.catch_warnings():
            # torch's note on protocol-4 pickles says nothing actionable; a refusal follows if it matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure to read is a refusal with a reason
        raise LGFormerError(f"{path}: cannot load {what}: {_reason(exc)}") from None


def load_safetensors_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU); a missing, corrupt or truncated one raises LGFormerError."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise LGFormerError(f"{path}: cannot load {what}: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    refused = next((line for line in lines if "GLOBAL" in line or "Unsupported operand" in line), None)
    if refused is not None:
        return f"refused to run pickle code ({refused.rstrip('.')})"
    if isinstance(exc, KeyError) or any("invalid load key" in line for line in lines):
        return "not a torch.save file"
    if any("zip archive" in line for line in lines):
        return "corrupt or truncated torch.save file"
    return lines[0][:200] if lines else type(exc).__name__
