"""Fidelity check against the authors' golden forward pass (shared/reference/official/README.md).

The authors' layout is produced from our model with `to_official`, filled with the deterministic
weight recipe, loaded back through `from_official`, and run on the golden inputs in fp32 eval mode.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from lgformer import config as config_mod
from lgformer.config import ModelConfig
from lgformer.convert.official import from_official, official_name, to_official
from lgformer.errors import LGFormerError
from lgformer.model.build import build_model
from lgformer.model.lgformer import LGFormer
from lgformer.safe_load import load_safetensors_file

VARIANTS = {
    "tiny-w7": ("official-swin-t", 7),
    "small-w7": ("official-swin-s", 7),
    "base-w12": ("official-swin-b", 12),
    "large-w12": ("official-swin-l", 12),
}
TOLERANCE = 1e-4


def recipe_value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The README's deterministic weight for tensor `key` (seeded by the CRC32 of its name)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    if key.endswith("weight") and len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 0
    std = fan_in**-0.5 if fan_in else 0.02
    return std * torch.randn(shape, generator=g)


def build_recipe_model(
    variant: str, text_encoder: bool = False, model_cfg: ModelConfig | None = None
) -> LGFormer:
    """Our model for `variant` (or `model_cfg`) carrying the recipe weights, loaded through the authors'
    layout: every parameter, the text encoder's too with `text_encoder` (the training golden)."""
    if variant not in VARIANTS:
        raise LGFormerError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    preset, window = VARIANTS[variant]
    cfg = model_cfg or config_mod.preset(preset).model
    cfg.window = window
    model = build_model(cfg, pretrained=False)
    official = to_official(model.state_dict())
    for name, _ in model.named_parameters():
        key = official_name(name)
        if text_encoder or not key.startswith("text_encoder."):
            official[key] = recipe_value(key, tuple(official[key].shape))
    model.load_state_dict(from_official(official, model))
    return model.eval()


@contextlib.contextmanager
def true_fp32() -> Iterator[None]:
    """CUDA products and cuDNN convolutions in fp32 proper: PyTorch lets cuDNN round to TF32 by default."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def verify_official(golden: str | Path, variant: str, device: torch.device | str = "cpu") -> dict[str, float]:
    """Max abs difference of each `logits_i` in the golden file against our model run on `device`."""
    golden = Path(golden)
    if not golden.is_file():
        raise LGFormerError(f"golden file {golden} not found")
    data = load_safetensors_file(golden, "the golden forward pass")
    for name in ("image", "text_features", "text_mask"):
        if name not in data:
            raise LGFormerError(f"{golden}: missing tensor {name!r}")
    targets = sorted((k for k in data if k.startswith("logits_")), key=lambda k: int(k.split("_")[1]))
    if not targets:
        raise LGFormerError(f"{golden}: holds no logits_<i> tensors to compare")
    model = build_recipe_model(variant).to(device)
    inputs = {k: data[k].to(device) for k in ("image", "text_mask", "text_features")}
    with torch.no_grad(), true_fp32():
        logits = model(inputs["image"], inputs["text_mask"], text_features=inputs["text_features"]).cpu()
    diffs = {}
    for name in targets:
        index = int(name.split("_")[1])
        if index >= logits.shape[1]:
            raise LGFormerError(f"{golden}: {name} but the model has only {logits.shape[1]} outputs")
        diffs[name] = (logits[:, index : index + 1].double() - data[name].double()).abs().max().item()
    return diffs
