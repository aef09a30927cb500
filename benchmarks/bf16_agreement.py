"""Do bf16 masks match fp32 masks? IoU between the two for a trained checkpoint (issue 6 target: >= 0.98).

    python benchmarks/bf16_agreement.py --checkpoint lite --synth-refs 400
    python benchmarks/bf16_agreement.py --set model.encoder_fp32_stages=0   # another precision policy

Every sentence of the real `refcoco-mini` photos (REFER layout, ../shared) and of `--synth-refs` objects of
the synthetic `val` split of the default model's seed (scenes it did not train on) is segmented twice
through `Segmenter.predict`: plain fp32, and under bf16 autocast (pixel decoder in fp32, as the authors).
Reported per source: overall IoU (summed intersections over summed unions), mean and worst per-sentence
IoU (two empty masks count as 1), pixel agreement, and how often the masks are identical.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lgformer.app.demo import SYNTH_SEED, SYNTH_SIZE
from lgformer.arguments import add_overrides_argument
from lgformer.data.sources import Referent, load_refer
from lgformer.data.synth.generate import generate
from lgformer.errors import LGFormerError
from lgformer.predictor import Segmenter, read_image

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "refcoco-mini"


def agreement(fp32: Segmenter, bf16: Segmenter, referents: list[Referent]) -> dict[str, float | int]:
    """Segment every sentence of `referents` with both segmenters; IoU statistics of the two masks, of their
    foregrounds (`IoU`, pooled) and of their backgrounds (`background_IoU`, pooled: a mask that covers
    most of the image is compared on the side it leaves out), and the largest difference between their
    probabilities (`max_probability_difference`: zero would mean bf16 never ran)."""
    inter = union = back_inter = back_union = agree = pixels = same = 0
    largest = 0.0
    ious = []
    for ref in referents:
        picture = read_image(ref.image)
        sentences = [s.text for s in ref.sentences]
        for a, b in zip(fp32.predict(picture, sentences), bf16.predict(picture, sentences)):
            i, u = int((a.mask & b.mask).sum()), int((a.mask | b.mask).sum())
            inter, union = inter + i, union + u
            back_inter, back_union = back_inter + a.mask.size - u, back_union + a.mask.size - i
            ious.append(i / u if u else 1.0)
            agree += int((a.mask == b.mask).sum())
            pixels += a.mask.size
            same += int(i == u)
            largest = max(largest, float(np.abs(a.probability - b.probability).max()))
    return {
        "sentences": len(ious),
        "IoU": inter / union if union else 1.0,
        "background_IoU": back_inter / back_union if back_union else 1.0,
        "mean_IoU": float(np.mean(ious)),
        "min_IoU": float(np.min(ious)),
        "pixel_agreement": agree / pixels,
        "identical": same / len(ious),
        "max_probability_difference": largest,
    }


def mini_referents() -> list[Referent]:
    """The three real RefCOCO referents of refcoco-mini with their photos."""
    return load_refer(MINI, "refcoco", "unc")


def synth_referents(out: Path, refs: int) -> list[Referent]:
    """`refs` objects of the synthetic `val` split of the default model's seed, written to `out`."""
    generate(out, {"val": refs}, SYNTH_SEED, SYNTH_SIZE)
    return load_refer(out, "synth", "synth")


def measure(
    checkpoint: str, synth_refs: int, device: str = "cpu", overrides: tuple[str, ...] = ()
) -> dict[str, dict]:
    """`agreement` on refcoco-mini and on `synth_refs` synthetic objects; `overrides` are config items."""
    fp32 = Segmenter.from_pretrained(checkpoint, device=device, overrides=overrides)
    bf16 = Segmenter.from_pretrained(checkpoint, device=device, dtype="bf16", overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"refcoco-mini": mini_referents(), "synthetic val": synth_referents(Path(tmp), synth_refs)}
        return {name: agreement(fp32, bf16, refs) for name, refs in sources.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="lite", help="checkpoint folder or shipped model (default: lite)")
    p.add_argument("--synth-refs", type=int, default=400, help="synthetic val objects (default 400)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    add_overrides_argument(p, "config override, e.g. model.encoder_fp32_stages=0 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = measure(args.checkpoint, args.synth_refs, overrides=tuple(args.overrides))
    except LGFormerError as exc:
        p.exit(2, f"bf16_agreement: error: {exc}\n")
    if args.json:
        print(json.dumps(results, indent=2))
        return
    header = ("sentences", "IoU", "background", "mean", "worst", "pixels", "identical", "max |dp|")
    print(f"{'source':<16} " + " ".join(f"{h:>{max(7, len(h))}}" for h in header))
    for name, r in results.items():
        print(
            f"{name:<16} {r['sentences']:>9} {r['IoU']:>7.4f} {r['background_IoU']:>10.4f} "
            f"{r['mean_IoU']:>7.4f} {r['min_IoU']:>7.4f} "
            f"{r['pixel_agreement']:>7.5f} {r['identical']:>9.1%} {r['max_probability_difference']:>8.4f}"
        )


if __name__ == "__main__":
    main()
