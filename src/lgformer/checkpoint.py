"""Our checkpoint format: a folder with `model.safetensors` and `config.json`. Every command loads it.

`config.json` holds the full config and `weights_exclude`, the name prefixes whose tensors are not
stored because they come from a pretrained source (e.g. a frozen MiniLM from its package). A checkpoint is
written whole into a temporary folder and swapped in (`lgformer.files.atomic_folder`): a kill at any
moment leaves the old or the new checkpoint complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lgformer import config as config_mod
from lgformer.config import Config
from lgformer.errors import LGFormerError
from lgformer.files import atomic_folder, crash_point
from lgformer.safe_load import load_safetensors_file, load_torch_file
from lgformer.shipped import DEFAULT_MODEL, SHIPPED

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"
FORMAT_VERSION = 1


def save_model(
    directory: str | Path,
    model: nn.Module,
    cfg: Config,
    dtype: torch.dtype | None = None,
    exclude: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write weights (optionally cast to `dtype`, minus tensors under `exclude`), config and, for a run's
    `last`, the resumable training state, as one folder swapped in whole (`atomic_folder`).

    `training_state` must hold only tensors and plain containers/numbers/strings, so that it loads back with
    `torch.load(weights_only=True)` (no arbitrary unpickling)."""
    directory = Path(directory)
    tensors = {}
    for key, value in model.state_dict().items():
        if key.startswith(exclude):
            continue
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().cpu()
    meta = {"format_version": FORMAT_VERSION, "weights_exclude": list(exclude), **(extra or {})}
    body = json.dumps({**meta, "config": config_mod.to_dict(cfg)}, indent=2)
    with atomic_folder(directory) as tmp:
        if training_state is not None:
            torch.save(training_state, tmp / TRAINER_STATE)
            crash_point("state-written")
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        crash_point("weights-written")
        (tmp / CONFIG).write_text(body)
    return directory


def missing_default_message(path: Path) -> str:
    """What to do when the default model is not installed (used by every command that loads it)."""
    return (
        f"the default '{DEFAULT_MODEL}' model is not installed (expected a checkpoint folder at {path}); "
        "retrain it with `lgformer demo --train` (hours on a CPU), or pass --checkpoint DIR (e.g. the "
        "authors' weights converted with `lgformer convert official CKPT --out DIR`)"
    )


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint folder, or the name of a model shipped in the package (`lite`)."""
    if str(source) in SHIPPED:
        path = SHIPPED[str(source)]
        if not (path / "config.json").is_file():
            raise LGFormerError(missing_default_message(path))
        return path
    if str(source) in config_mod.PRESETS:
        raise LGFormerError(
            f"preset {source!r} ships no weights; convert the authors' checkpoint with "
            "`lgformer convert official CKPT --out DIR` and pass DIR"
        )
    path = Path(source)
    if not path.is_dir():
        raise LGFormerError(
            f"checkpoint {source!r} is neither a folder nor a shipped model ({', '.join(SHIPPED)})"
        )
    return path


def read_config(directory: str | Path) -> tuple[Config, dict[str, Any]]:
    """The checkpoint's config and its metadata (everything in config.json besides the config)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise LGFormerError(f"{directory}: not a checkpoint folder ({CONFIG} not found)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LGFormerError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise LGFormerError(f"{path}: missing the 'config' field")
    cfg = config_mod.from_dict(Config, meta.pop("config"), str(path))
    return cfg, meta


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", overrides: tuple[str, ...] = ()
) -> tuple[nn.Module, Config]:
    """Build the model named by the checkpoint's config and load its weights (strict)."""
    from lgformer.model.build import build_model

    directory = Path(directory)
    cfg, meta = read_config(directory)
    for item in overrides:
        cfg = config_mod.apply_override(cfg, item)
    exclude = tuple(meta.get("weights_exclude", ()))
    # The checkpoint replaces every parameter but the excluded text encoder's (checked below), which
    # `TextEncoder.build` loads whole from its source: no random initialisation first.
    model = build_model(cfg.model, pretrained=bool(exclude), init=not set(exclude) <= {"text_encoder."})
    state = load_safetensors_file(directory / WEIGHTS, "the checkpoint's weights")
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(exclude)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        ]
        raise LGFormerError(
            f"{directory}: weights do not fit preset {cfg.preset or cfg.model.backbone!r} "
            f"({'; '.join(parts)})"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    return model.to(device).eval(), cfg


def load_training_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise LGFormerError(f"{directory}: no {TRAINER_STATE} (not a training checkpoint, cannot resume)")
    return load_torch_file(path, "the training state")
