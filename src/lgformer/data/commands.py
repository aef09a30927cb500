"""`lgformer data stats | check | export-jsonl | synth | from-instances`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lgformer.arguments import check_at_least
from lgformer.config import DATASETS
from lgformer.errors import LGFormerError


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's sub-commands to the `lgformer` parser."""
    data = sub.add_parser(
        "data", help="datasets: statistics, integrity check, JSONL export, synthetic benchmark"
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    stats = data_sub.add_parser(
        "stats", help="refs, sentences, images, objects, word-length buckets and token lengths of a split"
    )
    _source_arguments(stats, split_help="one split (default: all splits)")
    stats.add_argument(
        "--tokenizer", default="bert-base-uncased", help="tokenizer for token lengths (default %(default)s)"
    )
    stats.add_argument("--max-tokens", type=int, default=20, help="truncation length (default %(default)s)")
    stats.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stats.set_defaults(handler=_stats)

    check = data_sub.add_parser(
        "check", help="decode every image and mask of a split; report missing/corrupt files"
    )
    _source_arguments(check, split_help="one split (default: all splits)")
    check.add_argument("--gt-rule", default="exactly_one", help="exactly_one (default, authors') or union")
    check.set_defaults(handler=_check)

    export = data_sub.add_parser(
        "export-jsonl", help="write a dataset (or one split) in the custom JSONL format"
    )
    _source_arguments(export, split_help="one split (default: all splits)")
    export.add_argument("--out", required=True, help="output .jsonl file (paths in it are relative to it)")
    export.set_defaults(handler=_export)

    synth = data_sub.add_parser(
        "synth", help="generate the synthetic referring benchmark in the REFER layout"
    )
    synth.add_argument(
        "--out", required=True, help="output folder (use it as data.root with data.dataset=synth)"
    )
    synth.add_argument("--train", type=int, default=10000, help="training refs (default %(default)s)")
    synth.add_argument("--val", type=int, default=1000, help="validation refs (default %(default)s)")
    synth.add_argument("--test", type=int, default=1000, help="test refs (default %(default)s)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=320, help="image size in pixels (default %(default)s)")
    synth.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    synth.add_argument(
        "--sheet", default=None, help="also draw 8 val scenes with their expressions to this PNG"
    )
    _generalized_arguments(synth, "benchmark")
    synth.set_defaults(handler=_synth)

    inst = data_sub.add_parser(
        "from-instances",
        help="referring expressions from a COCO-format instance-segmentation set (REFER layout)",
    )
    inst.add_argument("--instances", required=True, help="COCO-format instances.json (COCO, LVIS, your own)")
    inst.add_argument("--images", required=True, help="the folder its file_name entries are relative to")
    inst.add_argument(
        "--splits", default=None, help="JSON object file_name -> split (default: every image is train)"
    )
    inst.add_argument(
        "--out", required=True, help="output folder (use it as data.root with data.dataset=instances)"
    )
    inst.add_argument("--per-object", type=int, default=2, help="refs per object (default %(default)s)")
    inst.add_argument("--seed", type=int, default=0)
    inst.add_argument(
        "--copy-paste", type=int, default=0, help="copy-pasted variants per train photo (default %(default)s)"
    )
    inst.add_argument("--no-flip", action="store_true", help="no mirrored variant of the train photos")
    inst.add_argument(
        "--min-area",
        type=float,
        default=0.005,
        help="drop instances below this share of the picture (default %(default)s)",
    )
    inst.add_argument(
        "--min-referent-area",
        type=float,
        default=0.02,
        help="describe only objects of at least this share of the picture; smaller ones stay distractors "
        "and landmarks (default %(default)s)",
    )
    _generalized_arguments(inst, "dataset")
    inst.set_defaults(handler=_from_instances)


def _generalized_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--generalized",
        action="store_true",
        help="add plural refs (several objects) and absent ones (no object), as gRefCOCO; without it the "
        f"classic {what}, byte for byte",
    )
    for kind, naming in (("plural", "naming several objects"), ("absent", "naming nothing")):
        parser.add_argument(
            f"--{kind}",
            type=float,
            default=None,
            help=f"with --generalized: share of all refs {naming} (default {GENERALIZED_SHARE}, at most 0.2)",
        )


def _source_arguments(parser: argparse.ArgumentParser, split_help: str) -> None:
    parser.add_argument(
        "--root",
        required=True,
        help="DATA_ROOT (REFER layout), synthetic folder, .jsonl file, or (stats only) a sentence .csv",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help=f"{' | '.join(DATASETS)} (default: jsonl for a .jsonl root, else refcoco)",
    )
    parser.add_argument(
        "--split-by", default="unc", help="refs(<split-by>).p, grefs(<split-by>).json (default %(default)s)"
    )
    parser.add_argument("--split", default=None, help=split_help)
    parser.add_argument("--image-dir", default=None, help="override the image folder")


def _referents(args: argparse.Namespace) -> list:
    from lgformer.data.dataset import DataConfig, load_referents, select_split
    from lgformer.data.sources import dataset_of, load_sentence_csv

    if args.root.endswith(".csv"):
        referents = load_sentence_csv(args.root)
    else:
        args.dataset = dataset_of(args.root, args.dataset, "refcoco")  # reported as read
        cfg = DataConfig(
            root=args.root, dataset=args.dataset, split_by=args.split_by, image_dir=args.image_dir
        )
        referents = load_referents(cfg)
    return referents if args.split is None else select_split(referents, args.split, args.root)


def _stats(args: argparse.Namespace) -> int:
    from lgformer.data.sources import TARGET_KINDS, target_kind
    from lgformer.text.lengths import BUCKETS, sentence_stats
    from lgformer.text.tokenizer import Tokenizer

    referents = _referents(args)
    sentences = [s.text for ref in referents for s in ref.sentences]
    objects = {
        obj
        for ref in referents
        if ref.object_id is not None
        for obj in (ref.object_id if isinstance(ref.object_id, tuple) else (ref.object_id,))
    }
    kinds = dict.fromkeys(TARGET_KINDS, 0)
    for ref in referents:
        kinds[target_kind(ref.targets)] += len(ref.sentences)
    report = {
        "source": args.root,
        "dataset": "sentence-csv" if args.root.endswith(".csv") else args.dataset,
        "split": args.split or ",".join(sorted({ref.split for ref in referents})),
        "refs": len(referents),
        "sentences": len(sentences),
        "images": len({ref.image_id for ref in referents}),
        "objects": len(objects) if objects else None,
        "kinds": kinds if referents[0].size is not None else None,  # sentences by objects named
        **sentence_stats(sentences, Tokenizer(args.tokenizer, args.max_tokens).encode, args.max_tokens),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['source']}  ({report['dataset']}, split {report['split']})")
    for key in ("refs", "sentences", "images", "objects"):
        value = report[key]
        print(
            f"  {key:<10} {value:>9,}" if value is not None else f"  {key:<10} {'-':>9}  (text-only source)"
        )
    total = max(1, report["sentences"])
    if report["kinds"]:
        print(
            "  sentences naming:  "
            + "   ".join(
                f"{kind}: {n:,} ({100 * n / total:.1f}%)"
                for kind, n in zip(("one object", "several", "nothing"), kinds.values())
            )
        )
    print(f"  words per sentence: mean {report['words_mean']:.2f}, max {report['words_max']}")
    print(
        "  length buckets (words):  "
        + "   ".join(
            f"{b}: {report['length_buckets'][b]:,} ({100 * report['length_buckets'][b] / total:.1f}%)"
            for b in BUCKETS
        )
    )
    tokens = report.get("tokens")
    if tokens:
        print(
            f"  tokens ({args.tokenizer}, with [CLS]/[SEP]): p50 {tokens['p50']:g}  p90 {tokens['p90']:g}  "
            f"p95 {tokens['p95']:g}  p99 {tokens['p99']:g}  max {tokens['max']}"
        )
        print(
            f"  truncated at {tokens['max_tokens']} tokens: {tokens['truncated']:,} sentences "
            f"({100 * tokens['truncated_share']:.2f}%)"
        )
    return 0


def _check(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lgformer.data.images import load_image
    from lgformer.data.sources import referent_mask

    if args.root.endswith(".csv"):
        raise LGFormerError(f"{args.root}: a sentence CSV has no images or masks to check")
    referents = _referents(args)
    problems: dict[str, int] = {"missing image": 0, "corrupt image": 0, "bad mask": 0, "empty mask": 0}
    sizes: dict[Path, tuple[int, int] | None] = {}

    def report(kind: str, message: str) -> None:
        problems[kind] += 1
        tqdm.write(f"{kind}: {message}")

    for ref in tqdm(referents, desc="checking", unit="ref"):
        if ref.image not in sizes:
            sizes[ref.image] = None
            if not ref.image.is_file():
                report("missing image", str(ref.image))
            else:
                try:
                    image = load_image(ref.image)
                    sizes[ref.image] = (image.height, image.width)
                except LGFormerError as exc:
                    report("corrupt image", str(exc))
        try:
            mask = referent_mask(ref, args.gt_rule)
        except LGFormerError as exc:
            report("bad mask", str(exc))
            continue
        size = sizes[ref.image]
        if size is not None and mask.shape != size:
            report(
                "bad mask", f"{ref.where}: mask {mask.shape[1]}x{mask.shape[0]}, image {size[1]}x{size[0]}"
            )
        elif not mask.any():
            report("empty mask", f"{ref.where}: no foreground pixel under rule {args.gt_rule}")
    found = sum(problems.values())
    print(
        f"checked {len(sizes):,} images and {len(referents):,} masks (gt rule {args.gt_rule}): "
        + ", ".join(f"{kind}: {n:,}" for kind, n in problems.items())
        + ("" if found else " - all good")
    )
    return 1 if found else 0


def _export(args: argparse.Namespace) -> int:
    from lgformer.data.sources import export_jsonl
    from lgformer.files import check_output_file

    if args.root.endswith(".csv"):
        raise LGFormerError(f"{args.root}: a sentence CSV has no images or masks to export")
    check_output_file(args.out)
    count = export_jsonl(_referents(args), args.out)
    print(f"wrote {count:,} referents to {args.out}")
    return 0


GENERALIZED_SHARE = 0.15  # plural and absent refs each, of all refs (gRefCOCO's order of magnitude)


def _generalized_shares(args: argparse.Namespace) -> dict[str, float]:
    """`plural` and `absent` shares from --generalized / --plural / --absent (0 without --generalized)."""
    shares = {kind: getattr(args, kind) for kind in ("plural", "absent")}
    if not args.generalized and any(v is not None for v in shares.values()):
        raise LGFormerError("--plural and --absent need --generalized")
    return {
        kind: (GENERALIZED_SHARE if v is None else v) if args.generalized else 0.0
        for kind, v in shares.items()
    }


def _synth(args: argparse.Namespace) -> int:
    import time

    from lgformer.data.synth.generate import generate
    from lgformer.data.synth.sheet import render_sheet
    from lgformer.files import check_output_folder

    shares = _generalized_shares(args)
    check_at_least(0, seed=args.seed, train=args.train, val=args.val, test=args.test)
    check_at_least(1, workers=args.workers)
    check_output_folder(args.out)
    start = time.perf_counter()
    counts = generate(
        args.out,
        {"train": args.train, "val": args.val, "test": args.test},
        args.seed,
        args.size,
        args.workers,
        **shares,
    )
    elapsed = time.perf_counter() - start
    print(
        f"wrote {counts['refs']:,} refs ({counts['images']:,} images, {counts['objects']:,} objects) "
        f"to {args.out} "
        f"in {elapsed:.1f} s with {args.workers} worker(s); use data.root={args.out} data.dataset=synth"
    )
    if args.sheet:
        render_sheet(args.out, args.sheet, split="val" if args.val else "train")
        print(f"sample sheet: {args.sheet}")
    return 0


def _from_instances(args: argparse.Namespace) -> int:
    import time

    from lgformer.data.instances.generate import from_instances
    from lgformer.files import check_output_folder

    shares = _generalized_shares(args)
    check_at_least(0, seed=args.seed)
    check_output_folder(args.out)
    start = time.perf_counter()
    counts = from_instances(
        args.instances,
        args.images,
        args.out,
        splits=args.splits,
        per_object=args.per_object,
        seed=args.seed,
        flip=not args.no_flip,
        copy_paste=args.copy_paste,
        min_area=args.min_area,
        min_referent_area=args.min_referent_area,
        **shares,
    )
    levels = ", ".join(f"{k}: {v:,}" for k, v in counts.items() if k.startswith("level"))
    levels += "".join(f", {kind}: {counts[kind]:,}" for kind in ("plural", "absent") if kind in counts)
    print(
        f"wrote {counts['refs']:,} refs, {counts['sentences']:,} sentences ({counts['images']:,} images, "
        f"{counts['objects']:,} objects; {levels}) to {args.out} in {time.perf_counter() - start:.1f} s; "
        f"use data.root={args.out} data.dataset=instances"
    )
    return 0
