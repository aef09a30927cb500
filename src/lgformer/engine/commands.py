"""`lgformer train`, `lgformer eval` and `lgformer bench`. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from lgformer.arguments import (
    add_device_argument,
    add_dtype_argument,
    add_overrides_argument,
    check_at_least,
)
from lgformer.config import DATASETS


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands to the `lgformer` parser."""
    p = sub.add_parser(
        "train",
        help="train a config (the paper's recipe by default); single process or under torchrun",
        description="Train into --out (last/, best/, log.jsonl, plots.png), or continue a run with --resume.",
    )
    p.add_argument("--config", help="preset name or YAML file (required unless --resume)")
    add_overrides_argument(p, "override a config value, e.g. train.batch_size=16 (repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder of a new run")
    p.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue the run in DIR from DIR/last, exactly"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop (and save) after this many optimizer steps; the schedule is unchanged",
    )
    add_device_argument(p)
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "eval",
        help="oIoU / mIoU / precision@K of a checkpoint (or of saved masks) on dataset splits",
        description="Evaluate every sentence of the split(s); report overall, per word-length bucket and per "
        "synthetic level. Data flags default to the checkpoint's data config.",
    )
    p.add_argument(
        "--checkpoint", help="checkpoint folder (model.safetensors + config.json) or shipped model (lite)"
    )
    p.add_argument(
        "--predictions",
        type=Path,
        metavar="DIR",
        help="score <sent_id>.png masks of any system instead of running a checkpoint",
    )
    p.add_argument(
        "--missing-as-empty", action="store_true", help="with --predictions: missing PNG = empty mask"
    )
    p.add_argument("--root", help="data root (REFER layout), JSONL file or synthetic-benchmark folder")
    p.add_argument("--dataset", help=" | ".join(DATASETS))
    p.add_argument("--split-by", help="refs(<split-by>).p, e.g. unc, umd, google")
    p.add_argument("--split", nargs="+", default=["val"], help="one or more splits (default %(default)s)")
    p.add_argument("--image-dir", help="image folder override")
    p.add_argument(
        "--image-size", type=int, help="network size S of the resized protocol (default: config / 480)"
    )
    p.add_argument(
        "--protocol",
        default="resized",
        choices=["resized", "original"],
        help="resized: GT resized to S x S (authors' code, default); original: prediction upsampled "
        "to the image size (paper text)",
    )
    p.add_argument(
        "--no-target-threshold",
        type=float,
        default=0.5,
        help="models with the no-target head: no-target probability above which the mask is empty (0.5)",
    )
    add_overrides_argument(p, "override a value of the checkpoint's config (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    p.add_argument("--out", type=Path, metavar="DIR", help="write report.json and report.md here")
    p.add_argument("--save-masks", type=Path, metavar="DIR", help="write <sent_id>.png predicted masks")
    p.add_argument("--save-overlays", type=Path, metavar="DIR", help="write image + prediction/GT overlays")
    p.add_argument(
        "--overlays", type=int, default=50, metavar="N", help="overlays of the first N (default 50)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    add_dtype_argument(p, "compute precision; fp16 needs a GPU (default fp32)")
    add_device_argument(p)
    p.set_defaults(handler=_eval)

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


def _train(args: argparse.Namespace) -> int:
    from lgformer import config as config_mod
    from lgformer.checkpoint import read_config
    from lgformer.engine import distributed
    from lgformer.engine.train import recover_run, train
    from lgformer.errors import LGFormerError
    from lgformer.files import check_output_folder

    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise LGFormerError("--resume DIR continues the run in DIR; do not also pass a different --out")
        recover_run(args.resume)
        # The run's own config unless --config names one (it must describe the same model).
        cfg = read_config(args.resume / "last")[0] if args.config is None else config_mod.load(args.config)
        for item in args.overrides:
            cfg = config_mod.apply_override(cfg, item)
        out = args.resume
    else:
        if args.config is None or args.out is None:
            raise LGFormerError("give --config and --out for a new run, or --resume DIR")
        cfg = config_mod.load(args.config, args.overrides)
        out = check_output_folder(args.out)
    try:
        result = train(
            cfg, out, resume=args.resume is not None, device=args.device, stop_after=args.stop_after
        )
    finally:
        distributed.cleanup()
    if distributed.world().main:
        best = f", best val oIoU {result.best_oiou:.2f}" if result.best_oiou is not None else ""
        state = "stopped" if result.stopped_early else "finished"
        took = f" after {result.train_seconds / 60:.1f} min of training"
        print(f"{state} at step {result.step}{took}{best}; checkpoint {result.last}")
    return 0


def _eval(args: argparse.Namespace) -> int:

    from lgformer import config as config_mod
    from lgformer.checkpoint import load_model
    from lgformer.data.dataset import DataConfig, build_dataset
    from lgformer.data.sources import dataset_of
    from lgformer.engine import distributed
    from lgformer.engine.evaluate import (
        MaskWriter,
        ScoringWarning,
        evaluate_model,
        evaluate_predictions,
        markdown,
        report,
    )
    from lgformer.errors import LGFormerError
    from lgformer.precision import autocast_dtype

    if (args.checkpoint is None) == (args.predictions is None):
        raise LGFormerError("give exactly one of --checkpoint DIR or --predictions DIR")
    check_at_least(1, batch_size=args.batch_size)
    check_at_least(0, workers=args.workers)
    if not 0 < args.no_target_threshold < 1:
        raise LGFormerError(
            f"--no-target-threshold {args.no_target_threshold}: must be strictly between 0 and 1"
        )
    if args.out is not None:
        from lgformer.files import check_output_folder

        check_output_folder(args.out)
    w, dev = distributed.setup(args.device)
    if args.checkpoint is not None:
        from lgformer.predictor import resolve_checkpoint

        model, cfg = load_model(resolve_checkpoint(args.checkpoint), dev, tuple(args.overrides))
        data = cfg.data
    else:
        if args.root is None or dataset_of(args.root, args.dataset) is None:
            raise LGFormerError("--predictions needs --root and --dataset (a .jsonl root needs no --dataset)")
        model, cfg, data = None, None, DataConfig()
    flags = {
        "root": args.root,
        "dataset": dataset_of(args.root, args.dataset),
        "split_by": args.split_by,
        "image_dir": args.image_dir,
        "image_size": args.image_size,
    }
    data = config_mod.merge(data, {k: v for k, v in flags.items() if v is not None}, "eval flags")
    tokenizer = None
    if model is not None:
        from lgformer.text.tokenizer import Tokenizer

        tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)
    reports = {}
    for split in args.split:
        dataset = build_dataset(data, split, train=False, tokenizer=tokenizer)
        if model is not None:
            writer = None  # sentence ids are unique across splits: one folder serves them all
            if args.save_masks or args.save_overlays:
                writer = MaskWriter(dataset, args.save_masks, args.save_overlays, args.overlays)
            counts = evaluate_model(
                model,
                dataset,
                dev,
                protocol=args.protocol,
                batch_size=args.batch_size,
                dtype=autocast_dtype(args.dtype, dev),
                workers=args.workers,
                progress=True,
                sink=writer,
                no_target_threshold=args.no_target_threshold,
            )
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ScoringWarning)
                counts = evaluate_predictions(
                    args.predictions,
                    dataset,
                    protocol=args.protocol,
                    missing_as_empty=args.missing_as_empty,
                    progress=True,
                )
            for warning in caught:
                print(f"lgformer eval: warning: {warning.message}", file=sys.stderr)
        reports[split] = report(counts, dataset, args.protocol)
    distributed.cleanup()
    if not w.main:
        return 0
    source = str(args.checkpoint or args.predictions)
    title = f"{data.dataset} ({data.split_by}) — {source}"
    body = reports[args.split[0]] if len(reports) == 1 else reports
    if args.out is not None:
        from lgformer.files import atomic_write

        text = json.dumps(
            {"source": source, "dataset": data.dataset, "split_by": data.split_by, "reports": reports},
            indent=2,
        )
        atomic_write(args.out / "report.json", lambda tmp: Path(tmp).write_text(text))
        atomic_write(args.out / "report.md", lambda tmp: Path(tmp).write_text(markdown(reports, title)))
    print(json.dumps(body) if args.json else markdown(reports, title))
    return 0


def _bench(args: argparse.Namespace) -> int:
    import json

    from lgformer.engine import bench

    check_at_least(1, batch=args.batch, repeat=args.repeat, size=args.size, threads=args.threads)
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
