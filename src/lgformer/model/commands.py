"""`lgformer summary` (a preset's network box by box) and `lgformer bench` (its speed and memory)."""

from __future__ import annotations

import argparse

from lgformer.cli import add_device_argument, add_dtype_argument, add_overrides_argument
from lgformer.errors import LGFormerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print a preset's network: boxes, parameter counts, output shapes")
    p.add_argument("--config", default="lite", help="preset name or YAML file (default %(default)s)")
    add_overrides_argument(p, "override a config value, e.g. model.decoder_layers=3 (repeatable)")
    p.add_argument("--size", type=int, default=None, help="input size for the shape trace (default: config)")
    p.set_defaults(handler=_summary)

    p = sub.add_parser(
        "bench",
        help="time a preset's network: latency, images/s, GFLOP, efficiency vs GEMM, peak memory",
        description="Random weights. Times the full forward as inference runs it (text encoder included, "
        "the prediction map only) and each box separately; "
        "efficiency = roofline / latency, the roofline being each compute dtype's GFLOP at the GEMM rate "
        "measured in the same process at that dtype.",
    )
    p.add_argument("--preset", default="lite", help="preset name or YAML file (default %(default)s)")
    p.add_argument("--size", type=int, default=None, help="square input size (default: the config's)")
    p.add_argument("--batch", type=int, default=1, help="images per forward (default %(default)s)")
    add_dtype_argument(p, "fp32 or autocast dtype (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (default %(default)s)")
    add_device_argument(p)
    p.add_argument("--train", action="store_true", help="also time one optimiser step (fwd + bwd + AdamW)")
    add_overrides_argument(
        p, "override a config value, e.g. model.decoder_fp32=false (the decoder follows --dtype) (repeatable)"
    )
    p.add_argument("--no-parts", dest="parts", action="store_false", help="skip the per-box timings")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(handler=_bench)


def _summary(args: argparse.Namespace) -> int:
    import torch

    from lgformer import config as config_mod
    from lgformer.model.build import build_model

    cfg = config_mod.load(args.config, args.overrides)
    model = build_model(cfg.model, pretrained=False).eval()
    size = args.size or cfg.data.image_size
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


def _bench(args: argparse.Namespace) -> int:
    import json

    from lgformer.engine import bench

    if min(args.batch, args.repeat, *(v for v in (args.size, args.threads) if v is not None)) < 1:
        raise LGFormerError("--batch, --repeat, --size and --threads must be >= 1")
    report = bench.run(
        args.preset,
        size=args.size,
        batch=args.batch,
        dtype=args.dtype,
        threads=args.threads,
        repeat=args.repeat,
        train=args.train,
        device=args.device,
        parts=args.parts,
        overrides=tuple(args.overrides),
    )
    print(json.dumps(report, indent=2) if args.json else bench.format_report(report))
    return 0
