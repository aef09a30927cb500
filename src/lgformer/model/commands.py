"""`lgformer summary`: a preset's network box by box."""

from __future__ import annotations

import argparse

from lgformer.arguments import add_overrides_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print a preset's network: boxes, parameter counts, output shapes")
    p.add_argument("--config", default="lite", help="preset name or YAML file (default %(default)s)")
    add_overrides_argument(p, "override a config value, e.g. model.decoder_layers=3 (repeatable)")
    p.add_argument("--size", type=int, default=None, help="input size for the shape trace (default: config)")
    p.set_defaults(handler=_summary)


def _summary(args: argparse.Namespace) -> int:
    import torch

    from lgformer import config as config_mod
    from lgformer.model.build import build_model

    sized = [f"data.image_size={args.size}"] if args.size is not None else []
    cfg = config_mod.load(args.config, [*args.overrides, *sized])  # --size is checked as data.image_size
    model = build_model(cfg.model, pretrained=False).eval()
    size = cfg.data.image_size
    print(
        f"preset: {cfg.preset or args.config}  backbone: {cfg.model.backbone}  fusion: {cfg.model.fusion}  "
        f"text encoder: {cfg.model.text_encoder}"
    )
    total = 0
    for name, module in model.named_children():
        count = sum(p.numel() for p in module.parameters())
        total += count
        print(f"  {name:<20} {type(module).__name__:<20} {count:>13,d} params")
    print(f"  {'total':<41} {total:>13,d} params")
    t = cfg.model.max_tokens
    with torch.no_grad():
        image = torch.zeros(1, 3, size, size)
        words = torch.zeros(1, t, model.text_encoder.dim)
        mask = torch.ones(1, t, dtype=torch.long)
        feats, _ = model.image_encoder(image, words, mask)
        logits = model(image, mask, text_features=words)
    print(f"  backbone features at {size}x{size}: " + ", ".join(str(tuple(f.shape[1:])) for f in feats))
    print(f"  output logits: {tuple(logits.shape)} (one map per prototype; the last is the prediction)")
    return 0
