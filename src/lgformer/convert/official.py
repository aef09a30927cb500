"""The authors' checkpoint layout <-> ours (docs/architecture.md#checkpoint-layout).

`to_official(state_dict)` renames our tensors to the authors' names (1x1 Conv1d weights regain their
trailing dimension, Swin `relative_position_index` buffers are added); `from_official(state, model)`
maps an authors' state dict onto `model`'s names, strictly: unknown, missing and mis-shaped tensors
are one error that lists them. `load_official_checkpoint` reads the authors' `torch.save` file without
running pickle code (`weights_only` with `argparse.Namespace` allow-listed).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lgformer.errors import LGFormerError
from lgformer.model.swin import relative_position_index
from lgformer.safe_load import load_torch_file

# The VLBA's 1x1 Conv1d projections: ours are Linear, theirs carry a trailing kernel dimension.
_FUSION = {
    "vis_project": "vis_project.0",
    "lang_project": "lang_project.0",
    "attn.query": "image_lang_att.query.0",
    "attn.key": "image_lang_att.key",
    "attn.value": "image_lang_att.value",
    "attn.W": "image_lang_att.W.0",
    "sym_value": "image_lang_att.sym_value.0",
    "sym_W": "image_lang_att.sym_W",
    "project_mm.0": "project_mm.0",
    "project_mm.1": "project_mm.3",
    "sym_project_mm.0": "sym_project_mm.0",
    "sym_project_mm.1": "sym_project_mm.3",
}
_FUSION_RE = "|".join(re.escape(k) for k in sorted(_FUSION, key=len, reverse=True))
_PIX = "classifier.pix_dec."
_GEN = "classifier.dynamic_conv_gen_body."

_RULES: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"^image_encoder\.trunk\.stages\.0\.downsample\.", "backbone.patch_embed."),
    (
        r"^image_encoder\.trunk\.stages\.(\d)\.downsample\.",
        lambda m: f"backbone.layers.{int(m[1]) - 1}.downsample.",
    ),
    (r"^image_encoder\.trunk\.stages\.(\d)\.blocks\.", r"backbone.layers.\1.blocks."),
    (
        rf"^image_encoder\.fusions\.(\d)\.({_FUSION_RE})\.",
        lambda m: f"backbone.layers.{m[1]}.fusion.{_FUSION[m[2]]}.",
    ),
    (r"^image_encoder\.vis_gates\.(\d)\.", r"backbone.layers.\1.res_gate."),
    (r"^image_encoder\.text_gates\.(\d)\.", r"backbone.layers.\1.sym_res_gate."),
    (r"^image_encoder\.out_norms\.(\d)\.", r"backbone.norm\1."),
    (r"^pixel_decoder\.input_proj\.", _PIX + "input_proj."),
    (r"^pixel_decoder\.level_embed$", _PIX + "transformer.level_embed"),
    (r"^pixel_decoder\.layers\.", _PIX + "transformer.encoder.layers."),
    (r"^pixel_decoder\.cross_layers\.", _PIX + "transformer.encoder.cross_attn_layers."),
    (r"^pixel_decoder\.key_embed\.", _PIX + "transformer.encoder.key_embed."),
    (r"^pixel_decoder\.lateral\.", _PIX + "adapter_1."),
    (r"^pixel_decoder\.output_conv\.", _PIX + "layer_1."),
    (r"^pixel_decoder\.mask_features\.", _PIX + "mask_features."),
    (r"^prototype_generator\.txt_proj\.", "classifier.txt_proj."),
    (r"^prototype_generator\.layers\.", _GEN + "layers."),
    (r"^prototype_generator\.query_embed\.", _GEN + "query_embed."),
    (r"^prototype_generator\.level_embed\.", _GEN + "level_embed."),
    (r"^head\.mlp\.", "classifier.dynamic_conv_gen_head."),
    (r"^text_encoder\.bert\.", "text_encoder."),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]
# Buffers the authors' files may carry that are recomputed here.
_IGNORED = re.compile(r"(relative_position_index|attn_mask|position_ids|token_type_ids)$")


def official_name(key: str) -> str:
    """Our tensor name -> the authors' name. Raises for tensors that have no official counterpart."""
    for pattern, repl in _COMPILED:
        new, count = pattern.subn(repl, key)
        if count:
            return new
    raise LGFormerError(
        f"tensor {key!r} has no counterpart in the authors' layout (only the VLBA Swin model does)"
    )


def _is_conv1d(official: str) -> bool:
    return ".fusion." in official and official.endswith(".weight")


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the authors' names and shapes (with recomputed `relative_position_index`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = official_name(key)
        out[name] = value.unsqueeze(-1) if _is_conv1d(name) else value
        if name.endswith("attn.relative_position_bias_table"):
            window = (int(round(value.shape[0] ** 0.5)) + 1) // 2
            out[name.replace("relative_position_bias_table", "relative_position_index")] = (
                relative_position_index(window)
            )
    return out


def from_official(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An authors' state dict -> tensors named for `model`. Strict: every tensor accounted for."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    ours = model.state_dict()
    names = {official_name(k): k for k in ours}
    unexpected = sorted(k for k in state if k not in names and not _IGNORED.search(k))
    missing = sorted(names[o] for o in names if o not in state)
    out: dict[str, torch.Tensor] = {}
    mismatched = []
    for official, key in names.items():
        if official not in state:
            continue
        value = state[official]
        if _is_conv1d(official) and value.dim() == 3 and value.shape[-1] == 1:
            value = value.squeeze(-1)
        if value.shape != ours[key].shape:
            mismatched.append(f"{official} {tuple(value.shape)} (expected {tuple(ours[key].shape)})")
        out[key] = value
    problems = []
    for label, items in (
        ("missing", [official_name(k) for k in missing]),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ):
        if items:
            shown = ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise LGFormerError("checkpoint does not match the model: " + "; ".join(problems))
    return out


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the authors' checkpoint (`torch.save` dict; the state dict under 'model', an
    argparse.Namespace under 'args') without executing pickle code. Returns the state dict."""
    path = Path(path)
    if not path.is_file():
        raise LGFormerError(f"checkpoint {path} not found (the authors' LGFormer .pth release file)")
    obj = load_torch_file(path, "the authors' checkpoint", allowed_globals=[argparse.Namespace])
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LGFormerError(f"{path}: expected a dict of tensors (or one under 'model')")
    return state


def infer_preset(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(preset name, window) of an authors' state dict, from its tensor shapes."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        embed = state["backbone.patch_embed.proj.weight"].shape[0]
        rows = state["backbone.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    except KeyError as exc:
        raise LGFormerError(f"not an LGFormer checkpoint: tensor {exc.args[0]!r} is missing") from None
    depth3 = len({k.split(".")[4] for k in state if k.startswith("backbone.layers.2.blocks.")})
    variant = {96: "swin-t" if depth3 == 6 else "swin-s", 128: "swin-b", 192: "swin-l"}.get(embed)
    if variant is None:
        raise LGFormerError(
            f"not an LGFormer checkpoint: patch-embedding width {embed} matches no Swin variant"
        )
    return f"official-{variant}", (int(round(rows**0.5)) + 1) // 2
