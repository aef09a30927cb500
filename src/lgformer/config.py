"""Configs as dataclasses: presets by name, YAML files, dotted `key=value` overrides.

A `Config` holds one section per area: `model` (the network), `data` (the dataset and its transforms,
`DataConfig`) and `train` (the optimisation recipe). Every command that takes a
config accepts a preset name or a YAML file plus `--set section.key=value` overrides; unknown keys and
wrongly typed values are errors that list what is valid. A YAML file starts from `base:` (a preset name or
another YAML file, relative to this one), then overlays its sections.
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
from lgformer.files import atomic_write


@dataclass
class ModelConfig:
    """Hyper-parameters of the network. Defaults are the authors' Swin-B model
    (docs/architecture.md#conventions-and-configurations)."""

    backbone: str = "swin-b"  # swin-t | swin-s | swin-b | swin-l | efficientnet-lite2
    window: int = 12  # Swin window size (the released checkpoints use 12)
    backbone_weights: str | None = None  # official Swin .pth, or "package" for EfficientNet-Lite2
    text_encoder: str = "bert-base-uncased"  # local BERT-layout folder, hub id, or "minilm" (offline)
    text_dropout: float | None = None  # BERT's hidden and attention dropout; None: its config's (0.1)
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
    # Generalized referring segmentation (not in the paper): a "does anything match?" logit beside the mask
    no_target_head: bool = False  # off in the official presets: the authors' network and checkpoints
    no_target_input: str = "prototype"  # prototype | pooled (with the features under the predicted mask)
    no_target_weight: float = 1.0  # its BCE's weight beside the mask loss
    loss_pos_weight: float = 1.1
    loss_all_outputs: bool = True  # deep supervision over every generator output
    loss_resolution: str = "input"  # input (official: upsampled logits) | quarter (paper Eq. 12-13)
    # What stays fp32 under bf16/fp16 autocast (plain fp32 runs are unaffected):
    decoder_fp32: bool = True  # the whole pixel decoder, as the authors; False: it follows autocast
    encoder_fp32_stages: int = 0  # leading image-encoder stages (trunk stage + fusion + gates + norm), 0-4


NO_TARGET_FIELDS = ("no_target_head", "no_target_input", "no_target_weight")  # the head beside the paper's


# Dataset names (`data.dataset`): the REFER release's, our generated REFER-layout sets, the JSONL format
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
SYNTH = "synth"
INSTANCES = "instances"  # `lgformer data from-instances`
GENERATED = (SYNTH, INSTANCES)  # our own REFER-layout sets: refs(<name>).p, images under images/<name>
GREFCOCO = "grefcoco"  # generalized referring expressions (no-target and multi-target), ReLA's layout
JSONL = "jsonl"
DATASETS = (*REFER_DATASETS, GREFCOCO, *GENERATED, JSONL)
MIXABLE = (*GENERATED, JSONL)  # `data.mix` sources: those with no split_by to choose
GT_RULES = ("exactly_one", "union")  # how a polygon annotation becomes a mask (data/masks.py)


def check_rule(rule: str) -> None:
    if rule not in GT_RULES:
        raise LGFormerError(f"unknown gt_rule {rule!r}; valid rules: {', '.join(GT_RULES)}")


@dataclass
class DataConfig:
    """Where the data is and how items are made (the `data` section of the project config)."""

    root: str = "data"  # DATA_ROOT (REFER layout), a JSONL file, or a synthetic-benchmark folder
    dataset: str = "refcoco"  # refcoco | refcoco+ | refcocog | refclef | grefcoco | jsonl | synth | instances
    split_by: str = "unc"  # refs(<split_by>).p; not used by jsonl; synth and instances: their own name
    image_dir: str | None = None  # override of the image folder (jsonl: base of the image paths)
    gt_rule: str = "exactly_one"  # polygons: exactly_one (authors' sum == 1 quirk) | union
    all_sentences: bool = False  # training: every sentence per epoch instead of one random per ref
    image_size: int = 480
    # Training only: more sources whose training-split referents join the training set, as "DATASET:ROOT"
    # (e.g. "synth:data/synth" beside real photos); validation and evaluation read `root` alone.
    mix: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_data_config(self)


MIN_IMAGE_SIZE = 32


def check_data_config(cfg: DataConfig) -> None:
    """Every field of the `data` section (run when a DataConfig is made)."""
    if cfg.dataset not in DATASETS:
        raise LGFormerError(f"unknown dataset {cfg.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    check_rule(cfg.gt_rule)
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise LGFormerError(
            f"data.image_size={cfg.image_size}; it must be at least {MIN_IMAGE_SIZE} pixels (the network "
            "reads the picture down to 1/32 of its size)"
        )
    for entry in cfg.mix:
        dataset = entry.split(":", 1)[0]
        if ":" not in entry or dataset not in MIXABLE:
            raise LGFormerError(
                f"data.mix: {entry!r}: expected DATASET:ROOT with DATASET one of {', '.join(MIXABLE)}"
            )


@dataclass
class TrainConfig:
    """Optimisation recipe. Defaults are the authors' (docs/architecture.md#training-recipe): AdamW 5e-5,
    weight decay 0.01
    with the no-decay groups, poly 0.9 per iteration over 40 epochs, global batch 32, BERT embeddings frozen,
    fp16 AMP on GPU (fp32 pixel decoder), deep supervision (the `model.loss_*` fields)."""

    pretrained: bool = True  # start from the backbone / text-encoder weights named in `model`
    init_from: str | None = None  # fine-tune: start from this checkpoint (folder or shipped name, e.g. lite)
    epochs: int = 40
    max_steps: int | None = None  # optimizer steps; when set, the run and its LR decay end here
    batch_size: int = 32  # global batch = device_batch x processes x accumulation steps
    device_batch: int | None = None  # micro-batch per process; None: batch_size / processes (no accumulation)
    lr: float = 5e-5  # new parts: fusion, gates, stage norms, pixel decoder, generator, head
    lr_pretrained: float | None = None  # pretrained trunk and text encoder; None: same as lr
    weight_decay: float = 0.01  # not on the trunk's norms and position tables nor the stage output norms
    warmup_steps: int = 0  # linear warm-up, multiplied with the poly decay
    poly_power: float = 0.9  # lr(it) = lr0 (1 - it / total)^power, stepped every iteration
    clip_grad: float | None = None  # max global gradient norm
    amp: str = "auto"  # auto (fp16 + grad scaler on GPU, fp32 on CPU) | off | bf16 | fp16
    freeze_bert_embeddings: bool = True  # the authors leave them out of the optimizer
    freeze_text_encoder: bool = False  # the whole text encoder (eval mode, no gradient)
    freeze_batchnorm: bool = False  # BatchNorm layers keep their pretrained running statistics
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (bitwise resume/DDP checks)
    workers: int = 4  # DataLoader worker processes per rank
    train_split: str = "train"
    val_split: str | None = "val"  # validated for model selection; None: no validation
    val_every: int = 0  # optimizer steps between validations; 0: after every epoch
    save_every: int = 0  # steps between `last` checkpoints besides validations and epoch ends; 0: only those
    log_every: int = 10  # steps between log lines

    def __post_init__(self) -> None:
        at_least = {
            "epochs": 1, "max_steps": 1, "batch_size": 1, "device_batch": 1, "warmup_steps": 0, "workers": 0,
            "val_every": 0, "save_every": 0, "log_every": 1, "weight_decay": 0, "lr_pretrained": 0,
            "poly_power": 0,
        }  # fmt: skip
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise LGFormerError(f"train.{name}={value}; it must be at least {low}")
        for name in ("lr", "clip_grad"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LGFormerError(f"train.{name}={value}; it must be positive")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
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
            # Under bf16 the whole EfficientNet-Lite2 encoder stays fp32: it keeps bf16 masks at IoU >= 0.98
            # with fp32 (README, "Speed"). On a CPU with AMX it trains faster in bf16 (encoder_fp32_stages=0;
            # README, "Training speed").
            encoder_fp32_stages=4,
        ),
        data=DataConfig(image_size=320),
        # Calibrated on a 2-core CPU (README, "lite"): the new parts learn at 3e-4, the pretrained trunk at
        # 5e-5 with its BatchNorm statistics kept, MiniLM is frozen; short warm-up, clipping.
        train=TrainConfig(
            batch_size=8,
            lr=3e-4,
            lr_pretrained=5e-5,
            warmup_steps=50,
            clip_grad=1.0,
            freeze_text_encoder=True,
            freeze_batchnorm=True,
            workers=2,
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


def from_dict(cls: type, data: dict[str, Any], where: str = "config", path: str = "") -> Any:
    """Build dataclass `cls` from a (possibly partial) dict, type-checking every field. `where` names the
    source (a file, `--set`), `path` the dotted section prefix, both only for error messages."""
    if not isinstance(data, dict):
        raise LGFormerError(
            f"{where}: {path.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise LGFormerError(f"{where}: unknown key {key!r}{_in(path)}; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, where, f"{path}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{where}: {path}{key}")
    return cls(**kwargs)


def _in(path: str) -> str:
    return f" in section {path.rstrip('.')!r}" if path else ""


def load(spec: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """A preset name or a YAML file, then dotted `key=value` overrides (values parsed as YAML)."""
    cfg = _load_spec(str(spec), Path.cwd(), ())
    for item in overrides:
        cfg = apply_override(cfg, item)
    return cfg


def _load_spec(text: str, relative_to: Path, chain: tuple[Path, ...]) -> Config:
    if text in PRESETS:
        return preset(text)
    path = (relative_to / text).resolve()
    if not path.is_file():
        raise LGFormerError(
            f"config {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file"
        )
    if path in chain:
        raise LGFormerError(f"{path}: `base:` chain loops back to this file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise LGFormerError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise LGFormerError(f"{path}: expected a mapping of config sections")
    cfg = Config()
    if data.get("base"):
        cfg = _load_spec(str(data.pop("base")), path.parent, (*chain, path))
    elif data.get("preset"):
        cfg = preset(data["preset"])
    data.pop("base", None)
    return merge(cfg, data, str(path))


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
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans: the field's type decides (amp=off)
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return merge(cfg, nested, "--set")


def save(cfg: Config, path: str | Path) -> None:
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _deep_update(
    base: dict[str, Any], data: dict[str, Any], where: str, hints: dict[str, Any], path: str = ""
) -> dict:
    if not isinstance(data, dict):
        raise LGFormerError(
            f"{where}: {path.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}"
        )
    out = dict(base)
    for key, value in data.items():
        if key not in base:
            raise LGFormerError(f"{where}: unknown key {key!r}{_in(path)}; valid keys: {', '.join(base)}")
        tp = hints.get(key)
        if isinstance(base[key], dict) and tp is not None and dataclasses.is_dataclass(tp):
            out[key] = _deep_update(base[key], value, where, typing.get_type_hints(tp), f"{path}{key}.")
        else:
            out[key] = value
    return out


_WORDS_OF_BOOL = {"yes": True, "on": True, "no": False, "off": False}


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
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and isinstance(value, str) and value.lower() in _WORDS_OF_BOOL:
        return _WORDS_OF_BOOL[value.lower()]
    if tp is bool and not isinstance(value, bool):
        raise LGFormerError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LGFormerError(f"{where}: expected an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise LGFormerError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value
