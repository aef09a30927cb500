"""`lgformer predict | serve | demo`. Heavy imports stay inside the handlers."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lgformer.arguments import (
    add_device_argument,
    add_dtype_argument,
    add_overrides_argument,
    check_at_least,
)
from lgformer.shipped import DEFAULT_MODEL, SHIPPED


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands to the `lgformer` parser."""
    p = sub.add_parser(
        "predict",
        help="segment what each expression names in each image: mask PNG, overlay PNG, JSON summary",
        description="Run every --text on every --image; write <image>_<k>_mask.png (0/255, original size), "
        "<image>_<k>_overlay.png and predictions.json into --out.",
    )
    _model_arguments(p)
    p.add_argument("--image", action="append", required=True, help="image file (repeatable)")
    p.add_argument("--text", action="append", required=True, help="referring expression (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--threshold", type=float, default=0.5, help="probability above which a pixel is the object (0.5)"
    )
    p.add_argument(
        "--no-target-threshold",
        type=float,
        default=0.5,
        help="models with the no-target head: no-target probability above which nothing matches (0.5)",
    )
    p.set_defaults(handler=_predict)

    p = sub.add_parser(
        "serve",
        help="web page (Gradio): upload an image, type an expression, see and download the mask",
        description="Serve a page on http://HOST:PORT (loopback by default) until interrupted.",
    )
    _model_arguments(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=20.0,
        help="largest accepted upload in MB (default %(default)s)",
    )
    p.set_defaults(handler=_serve)

    p = sub.add_parser(
        "demo",
        help="the default model at work on generated scenes: gallery and oIoU per level (no weights needed)",
        description="Score the default lite model (or --checkpoint) on a held-out synthetic split, per "
        "complexity level, and draw a gallery of its predictions. --train retrains the default model first.",
    )
    p.add_argument(
        "--checkpoint", default=DEFAULT_MODEL, help="checkpoint folder or shipped model (default %(default)s)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("lgformer-demo"), help="output folder (default %(default)s)"
    )
    p.add_argument(
        "--eval-refs", type=int, default=96, help="held-out objects to score (default %(default)s)"
    )
    p.add_argument(
        "--real",
        type=Path,
        default=None,
        help="JSONL of real photos and sentences to score and draw first (default: coco-subset's "
        "refcoco-real.jsonl beside the repository, when it is there; 'none' to leave them out)",
    )
    p.add_argument(
        "--scenes",
        type=int,
        default=8,
        help="held-out scenes in the gallery, levels 1-4 in turn (default %(default)s)",
    )
    add_device_argument(p)
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="scene generation processes (default: all cores)",
    )
    train = p.add_argument_group(
        "retraining (--train): the shipped default model's synthetic stage (README: the real-photo stages)"
    )
    train.add_argument(
        "--train", action="store_true", help="retrain the default model's synthetic stage from scratch first"
    )
    train.add_argument("--steps", type=int, default=6000, help="optimizer steps (default %(default)s)")
    train.add_argument(
        "--train-refs", type=int, default=12000, help="synthetic training objects (default %(default)s)"
    )
    train.add_argument(
        "--val-refs", type=int, default=400, help="synthetic validation objects (default %(default)s)"
    )
    add_overrides_argument(train, "training config override")
    p.set_defaults(handler=_demo)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_MODEL,
        help="checkpoint folder (ours, or `lgformer convert official` output) or a shipped model "
        "(default %(default)s)",
    )
    add_device_argument(p)
    add_dtype_argument(p, "compute precision; fp16 needs a GPU (default fp32)")
    add_overrides_argument(
        p, "override a value of the checkpoint's config, e.g. data.image_size=384 (repeatable)"
    )


def _predict(args: argparse.Namespace) -> int:
    from lgformer.app.predict import predict_files
    from lgformer.errors import LGFormerError
    from lgformer.files import check_output_folder

    urls = [image for image in args.image if "://" in image]
    if urls:
        raise LGFormerError(f"--image {urls[0]}: a URL; lgformer reads local files only (download it first)")
    for flag, value in (("--threshold", args.threshold), ("--no-target-threshold", args.no_target_threshold)):
        if not 0 < value < 1:
            raise LGFormerError(f"{flag} {value}: must be strictly between 0 and 1")
    check_output_folder(args.out)
    summary = predict_files(
        args.checkpoint,
        [Path(image) for image in args.image],
        args.text,
        args.out,
        threshold=args.threshold,
        no_target_threshold=args.no_target_threshold,
        device=args.device,
        dtype=args.dtype,
        overrides=args.overrides,
    )
    print(f"wrote {len(summary['predictions'])} masks and overlays, and predictions.json, to {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lgformer.app.serve import check_address, serve
    from lgformer.errors import LGFormerError
    from lgformer.predictor import Segmenter

    if not args.max_upload_mb > 0:
        raise LGFormerError(f"--max-upload-mb {args.max_upload_mb}: expected a positive size")
    check_address(args.host, args.port)
    seg = Segmenter.from_pretrained(args.checkpoint, args.device, args.dtype, args.overrides)
    serve(seg, args.host, args.port, args.max_upload_mb)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lgformer.app import demo
    from lgformer.files import check_output_folder
    from lgformer.predictor import Segmenter

    check_at_least(1, eval_refs=args.eval_refs, scenes=args.scenes, workers=args.workers)
    if args.train:
        check_at_least(1, steps=args.steps, train_refs=args.train_refs, val_refs=args.val_refs)
    check_output_folder(args.out)
    checkpoint = args.checkpoint
    if args.train:
        checkpoint = demo.train_default(
            args.out / "train",
            steps=args.steps,
            train_refs=args.train_refs,
            val_refs=args.val_refs,
            device=args.device,
            workers=args.workers,
            overrides=tuple(args.overrides),
        )
        print(f"retrained model: {checkpoint} (copy it to {SHIPPED[DEFAULT_MODEL]} to make it the default)")
    real = args.real if args.real is not None else demo.REAL_SENTENCES
    if str(real) == "none" or (args.real is None and not real.is_file()):
        print("real photos: left out (no refcoco-real.jsonl beside the repository; pass --real FILE)")
        real = None
    seg = Segmenter.from_pretrained(checkpoint, args.device)
    summary = demo.run_demo(
        seg,
        args.out,
        eval_refs=args.eval_refs,
        scenes=args.scenes,
        workers=args.workers,
        real=real,
    )
    out = args.out.resolve()
    print(f"\nmodel: {checkpoint}")
    if summary["real"]:
        r = summary["real"]
        print(
            f"real photos: {r['sentences']} RefCOCO sentences ({r['file']}), original protocol: "
            f"oIoU {r['oIoU']:.1f}, mIoU {r['mIoU']:.1f}, P@0.5 {r['P@0.5']:.1f}"
        )
    print(f"held-out synthetic split (test split of seed {demo.SYNTH_SEED}), oIoU / mIoU in %:")
    print("\n".join("  " + line for line in demo.level_table(summary)))
    if summary["sets"]:
        print(f"nothing matches / all of these: {demo.sets_line(summary['sets'])}")
    print(f"\ngallery: {out / 'gallery.png'}\npage:    {out / 'index.html'}\noverlays: {out / 'overlays'}")
    print(f"(data, scoring and gallery: {summary['seconds']:.0f} s)")
    return 0
