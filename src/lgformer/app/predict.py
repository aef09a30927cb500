"""`lgformer predict`: every (image, expression) pair -> mask PNG + overlay PNG, and one JSON summary.

Every input is checked before anything is written (expressions, then every image), so a bad input fails the
run with its message and leaves no partial output; warnings (truncated expressions, unknown words) are
printed once.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lgformer import config as config_mod
from lgformer.checkpoint import read_config
from lgformer.files import atomic_write
from lgformer.predictor import (
    InputWarning,
    Prediction,
    Segmenter,
    encode_sentences,
    read_image,
    resolve_checkpoint,
)
from lgformer.render import mask_image, overlay, save_png
from lgformer.text.tokenizer import Tokenizer

SUMMARY = "predictions.json"


def predict_files(
    source: str,
    images: list[Path],
    texts: list[str],
    out: Path,
    *,
    threshold: float = 0.5,
    no_target_threshold: float = 0.5,
    device: str = "auto",
    dtype: str = "fp32",
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every text on every image with the checkpoint `source`; write `<stem>_<k>_mask.png`,
    `<stem>_<k>_overlay.png` (k: the text's 1-based position) and `predictions.json` under `out`. Inputs are
    checked before the model is loaded. Returns the summary."""
    directory = resolve_checkpoint(source)
    cfg, _ = read_config(directory)
    for item in overrides:
        cfg = config_mod.apply_override(cfg, item)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        encode_sentences(Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens), texts)
    for warning in caught:
        print(f"lgformer predict: warning: {warning.message}", file=sys.stderr)
    pictures = [read_image(path) for path in images]
    seg = Segmenter.from_pretrained(directory, device, dtype, overrides)
    records = []
    for path, picture, stem in zip(images, pictures, _unique_stems(images)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)  # already reported above
            predictions = seg.predict(picture, texts, threshold, no_target_threshold=no_target_threshold)
        for k, pred in enumerate(predictions, start=1):
            mask_path = save_png(out / f"{stem}_{k}_mask.png", mask_image(pred.mask))
            note = describe(pred)
            picture_path = out / f"{stem}_{k}_overlay.png"
            overlay_path = save_png(picture_path, overlay(picture, pred.mask, pred.sentence, note))
            records.append(
                {
                    "image": str(path),
                    "width": picture.width,
                    "height": picture.height,
                    "sentence": pred.sentence,
                    "mask": mask_path.name,
                    "overlay": overlay_path.name,
                    "score": round(pred.score, 4),
                    "area": int(pred.mask.sum()),
                    "bbox": pred.bbox,
                    "no_target": pred.no_target,
                    "target_score": None if pred.target_score is None else round(pred.target_score, 4),
                }
            )
            print(f"{path.name}: {pred.sentence!r} -> {overlay_path} ({note})")
    summary = {
        "checkpoint": str(source),
        "threshold": threshold,
        "no_target_threshold": no_target_threshold if seg.model.target_head is not None else None,
        "image_size": seg.image_size,
        "predictions": records,
    }
    atomic_write(out / SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary


def describe(pred: Prediction) -> str:
    """One line for a result: "nothing matches" plainly, else the mask's score and size."""
    if pred.no_target:
        return f"nothing matches (match probability {pred.target_score:.2f})"
    note = f"score {pred.score:.2f}, {100 * pred.mask.mean():.1f}% of the image"
    return note if pred.target_score is None else f"{note}, match probability {pred.target_score:.2f}"


def _unique_stems(paths: list[Path]) -> list[str]:
    """File stems, numbered on repeats (a/x.jpg and b/x.jpg -> x, x-2)."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stems.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return stems
