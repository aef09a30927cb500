"""Real photos: models and baselines on the 200 real RefCOCO / RefCOCO+ / RefCOCOg sentences of coco-subset.

Every row is scored by the project's metric code (`evaluate_model` / `evaluate_predictions`, then `report`)
over all sentences of `refcoco-real.jsonl` (its splits together), under both protocols:
- `whole image`: every pixel is the object;
- `largest of the category`: an oracle that knows the referent's COCO category (from the instance its
  mask matches best) and answers with the largest instance of that category in the photo;
- each checkpoint given (`lite` is the shipped default model).

    python benchmarks/real_photos.py --checkpoints lite runs/coco-lite/best --out benchmarks/results/real.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from lgformer.checkpoint import load_model
from lgformer.data.dataset import ReferDataset
from lgformer.data.masks import decode_segmentation
from lgformer.data.sources import load_jsonl, referent_mask
from lgformer.engine.evaluate import evaluate_model, evaluate_predictions, report
from lgformer.files import atomic_write
from lgformer.predictor import resolve_checkpoint
from lgformer.text.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-subset"
PROTOCOLS = ("original", "resized")
KEYS = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9")


def dataset(root: Path, tokenizer: Tokenizer | None = None, image_size: int = 480) -> ReferDataset:
    return ReferDataset(
        load_jsonl(root / "refcoco-real.jsonl"),
        train=False,
        image_size=image_size,
        gt_rule="union",
        tokenizer=tokenizer,
    )


def write_baselines(root: Path, data: ReferDataset, out: Path) -> dict[str, Path]:
    """`<sent_id>.png` for the whole-image and largest-of-category baselines."""
    instances = json.loads((root / "instances.json").read_text())
    by_file = {im["file_name"]: im for im in instances["images"]}
    anns: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    folders = {"whole image": out / "whole", "largest of the category": out / "largest"}
    for index in range(len(data)):
        ref = data.referent(index)
        image = by_file[ref.image.name]
        h, w = image["height"], image["width"]
        gt = referent_mask(ref, "union")
        masks = [
            (a, decode_segmentation(a["segmentation"], h, w, "union", "instances")) for a in anns[image["id"]]
        ]
        best = max(masks, key=lambda am: (am[1] & gt).sum() / max((am[1] | gt).sum(), 1))[0]
        same = [m for a, m in masks if a["category_id"] == best["category_id"]]
        predictions = {"whole image": np.ones((h, w), bool), "largest of the category": max(same, key=np.sum)}
        name = f"{data.sentence(index).sent_id}.png"
        for key, folder in folders.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(predictions[key].astype(np.uint8) * 255).save(folder / name)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=SHARED, help="coco-subset folder")
    parser.add_argument(
        "--checkpoints", nargs="*", default=["lite"], help="checkpoint folders or shipped names"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    rows: dict[str, dict[str, dict]] = {}
    plain = dataset(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in write_baselines(args.root, plain, Path(tmp)).items():
            rows[name] = {
                p: report(evaluate_predictions(folder, plain, protocol=p), plain, p) for p in PROTOCOLS
            }
    for source in args.checkpoints:
        model, cfg = load_model(resolve_checkpoint(source))
        data = dataset(
            args.root, Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens), cfg.data.image_size
        )
        rows[source] = {p: report(evaluate_model(model, data, "cpu", protocol=p), data, p) for p in PROTOCOLS}
    print(f"{len(plain)} real sentences; oIoU / mIoU / P@0.5 / P@0.7 / P@0.9 in %")
    for name, by_protocol in rows.items():
        cells = "  ".join(f"{p}: " + " / ".join(f"{by_protocol[p][k]:.1f}" for k in KEYS) for p in PROTOCOLS)
        print(f"{name:<28} {cells}")
    if args.out is not None:
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2)))


if __name__ == "__main__":
    main()
