"""Configs as dataclasses: presets by name, YAML files, dotted `key=value` overrides.

A `Config` holds one section per area (`model`, and the sections other areas add). Every command that
takes a config accepts a preset name or a YAML file plus `--set section.key=value` overrides; unknown keys
and wrongly typed values are errors that list what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lgformer.errors import LGFormerError


@dataclass
class ModelConfig:
    """Hyper-parameters of the network. Defaults are the authors' Swin-B model (spec §0.1, §12)."""

    backbone: str = "swin-b"  # swin-t | swin-s | swin-b | swin-l | efficientnet-lite2
    window: int = 12  # Swin window size (the released checkpoints use 12)
    backbone_weights: str | None = None  # official Swin .pth, or "package" for EfficientNet-Lite2
    text_encoder: str = "bert-base-uncased"  # local BERT-layout folder, hub id, or "minilm" (offline)
    max_tokens: int = 20  # wordpieces incl. [CLS]/[SEP]; the decoder's key table has this many rows
    fusion: str = "vlba"  # vlba (bidirectional, the paper) | pwam (LAVT's one-way module, Table 4)
    fusion_heads: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    gate_init: str = "trunc_normal"  # trunc_normal (official-effective) | zeros (as written)
    drop_path: float = 0.3  # Swin stochastic depth, linearly spaced over blocks (training only)
    decoder_dim: int = 256
    decoder_heads: int = 8
    decoder_layers: int = 6  # Table 5 uses 3
    decoder_points: int = 4
    decoder_ffn: int = 1024
    l2va: bool = True  # cross-attention from pixels to words in the pixel decoder
    l2va_keys: str = "word"  # word | sentence (Table 6)
    l2va_ffn: int = 2048
    query: str = "linguistic"  # linguistic (sentence query) | learnable (Table 2 baseline)
    num_queries: int = 1  # learnable queries K (1 or 10); their K masks are merged by a 3-layer MLP
    v2la: bool = True  # prototype generator on; off: prototype = projected sentence embedding
    generator_layers: int = 6
    generator_heads: int = 8
    generator_ffn: int = 2048
    head_bias: bool = True  # the head's MLP emits 256 kernel weights + 1 bias (official)
    loss_pos_weight: float = 1.1
    loss_all_outputs: bool = True  # deep supervision over every generator output
    loss_resolution: str = "input"  # input (official: upsampled logits) | quarter (paper Eq. 12-13)
    image_size: int = 480


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str | None = None


def _official(backbone: str, window: int) -> Config:
    return Config(model=ModelConfig(backbone=backbone, window=window), preset=f"official-{backbone}")


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "official-swin-t": lambda: _official("swin-t", 7),
    "official-swin-s": lambda: _official("swin-s", 7),
    "official-swin-b": lambda: _official("swin-b", 12),
    "official-swin-l": lambda: _official("swin-l", 12),
    # CPU-trainable: ImageNet EfficientNet-Lite2 + MiniLM-L6 (384-d), both offline. Decoder width 128 and
    # 3 decoder / generator layers: the 1/8-scale deformable attention and the trunk's depthwise backward
    # dominate a CPU step, and 3 layers keep one 320x320 batch-8 step in seconds (README, "lite").
    "lite": lambda: Config(
        model=ModelConfig(
            backbone="efficientnet-lite2",
            backbone_weights="package",
            text_encoder="minilm",
            drop_path=0.0,
            decoder_dim=128,
            decoder_layers=3,
            decoder_ffn=512,
            l2va_ffn=512,
            generator_layers=3,
            generator_ffn=1024,
            image_size=320,
        ),
        preset="lite",
    ),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise LGFormerError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a (possibly partial) dict, type-checking every field."""
    if not isinstance(data, dict):
        raise LGFormerError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise LGFormerError(f"{where}: unknown key {key!r}; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def load(spec: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """A preset name or a YAML file, then dotted `key=value` overrides (values parsed as YAML)."""
    text = str(spec)
    if text in PRESETS:
        cfg = preset(text)
    else:
        path = Path(text)
        if not path.is_file():
            raise LGFormerError(
                f"config {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file"
            )
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LGFormerError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        base = preset(data.pop("preset")) if isinstance(data, dict) and data.get("preset") else Config()
        cfg = merge(base, data, str(path))
    for item in overrides:
        cfg = apply_override(cfg, item)
    return cfg


def merge(cfg: Config, data: dict[str, Any], where: str = "config") -> Config:
    """Overlay a nested dict on `cfg`, field by field, with type checks."""
    merged = _deep_update(to_dict(cfg), data, where, typing.get_type_hints(type(cfg)))
    return from_dict(type(cfg), merged, where)


def apply_override(cfg: Config, item: str) -> Config:
    if "=" not in item:
        raise LGFormerError(f"--set {item!r}: expected key=value, e.g. model.fusion=pwam")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return merge(cfg, nested, f"--set {key}")


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _deep_update(base: dict[str, Any], data: dict[str, Any], where: str, hints: dict[str, Any]) -> dict:
    if not isinstance(data, dict):
        raise LGFormerError(f"{where}: expected a mapping, got {type(data).__name__}")
    out = dict(base)
    for key, value in data.items():
        if key not in base:
            raise LGFormerError(f"{where}: unknown key {key!r}; valid keys: {', '.join(base)}")
        tp = hints.get(key)
        if isinstance(base[key], dict) and tp is not None and dataclasses.is_dataclass(tp):
            out[key] = _deep_update(base[key], value, where, typing.get_type_hints(tp))
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except LGFormerError as exc:
                errors.append(str(exc))
        raise LGFormerError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise LGFormerError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise LGFormerError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LGFormerError(f"{where}: expected an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise LGFormerError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
