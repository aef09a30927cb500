"""`lgformer demo`: the system working end to end on a fresh machine, with no weights to supply.

1. load the default `lite` model shipped in the package (or `--checkpoint DIR`);
2. real photos first, where the real RefCOCO sentences of coco-subset are at hand (`--real`, by default the
   repository's `../shared/data/coco-subset/refcoco-real.jsonl`): score them (`original` protocol) and draw
   every photo with the first sentence of each of its referents;
3. generate the held-out synthetic split with the data package's generator: the `test` split of the seed
   the default model was trained with (scenes derive from (seed, split, index), so it is disjoint from the
   training and validation scenes);
4. measure oIoU per complexity level on it with the engine's evaluator (`resized` protocol);
5. segment a handful of its scenes (two per level by default, an expression for each of their referred
   objects) through the public `Segmenter` and write the overlays, a one-page gallery PNG and an HTML page;
6. for a model with the no-target head, the same scenes as the generalized benchmark makes them, with an
   expression naming several objects ("both triangles") and one naming nothing ("the green star" where no
   star is green) each where the grammar has one: the plural ones' IoU against the union of their objects,
   how many of the absent ones the model answers with "nothing matches", and their overlays.

`--train` first retrains the default model's first, synthetic stage from scratch with the recipe below (the
engine's trainer, lite preset on synthetic data, with its progress bar; the README gives the real-photo stages
that follow it), stores it like the shipped one (fp16 safetensors without the frozen MiniLM) and then runs the
demo on it.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lgformer.files import atomic_write
from lgformer.predictor import Segmenter, read_image
from lgformer.render import overlay, save_png

SYNTH_SEED = 0  # the benchmark seed of the default model's training data; its `test` split is held out
SYNTH_SIZE = 320
LEVELS = {1: "shape", 2: "attributes", 3: "one relation", 4: "ordinal, negation or two relations"}
TILE = 320
REAL_IN_PNG = 6  # real-photo overlays on the one-page gallery (all of them are on the HTML page)
# the real RefCOCO sentences on the coco-subset `eval` photos, beside a clone of the repository
REAL_SENTENCES = (
    Path(__file__).resolve().parents[4] / "shared" / "data" / "coco-subset" / "refcoco-real.jsonl"
)

# The recipe of the default model (`--train`, with the step and data counts of `lgformer demo --help`): the
# lite preset on synthetic data.
TRAIN_SETTINGS = ("data.image_size=256", "train.val_every=500", "train.log_every=25")


def run_real(seg: Segmenter, sentences: Path, out: Path) -> tuple[dict[str, Any], list[dict]]:
    """Score `seg` on the real sentences of a JSONL file (`original` protocol, every split together) and
    draw each photo with the first sentence of each of its referents; returns the scores and the tiles."""
    from lgformer.data.dataset import ReferDataset
    from lgformer.data.sources import load_jsonl
    from lgformer.engine.evaluate import evaluate_model, report

    referents = load_jsonl(sentences)
    dataset = ReferDataset(
        referents, train=False, image_size=seg.cfg.data.image_size, gt_rule="union", tokenizer=seg.tokenizer
    )
    counts = evaluate_model(
        seg.model, dataset, seg.device, protocol="original", dtype=seg.dtype, progress=True
    )
    scores = report(counts, dataset, "original")
    tiles = _gallery_tiles(seg, referents, len(referents), "union", out / "overlays-real")
    keys = ("oIoU", "mIoU", "P@0.5", "P@0.7", "P@0.9")
    photos = len({ref.image for ref in referents})
    summary = {
        "sentences": len(dataset),
        "photos": photos,
        "file": str(sentences),
        **{k: scores[k] for k in keys},
    }
    return summary, tiles


def run_demo(
    seg: Segmenter,
    out: Path,
    *,
    eval_refs: int,
    scenes: int,
    workers: int = 1,
    real: Path | None = None,
) -> dict[str, Any]:
    """Score `seg` on the real sentences of `real` (when given) and on `eval_refs` objects of the held-out
    synthetic split, and draw the gallery: the real photos, then the first `scenes` synthetic scenes (scene i
    is of level 1 + i % 4), under `out`; returns the summary."""
    from lgformer.data.dataset import build_dataset
    from lgformer.data.synth.generate import generate
    from lgformer.engine.evaluate import evaluate_model, report

    start = time.perf_counter()
    real_scores, real_tiles = run_real(seg, real, out) if real is not None else (None, [])
    data = out / "data"
    generate(data, {"test": eval_refs}, SYNTH_SEED, SYNTH_SIZE, workers)
    config = dataclasses.replace(seg.cfg.data, root=str(data), dataset="synth", image_dir=None)
    dataset = build_dataset(config, "test", train=False, tokenizer=seg.tokenizer)
    counts = evaluate_model(seg.model, dataset, seg.device, dtype=seg.dtype, progress=True)
    scores = report(counts, dataset, "resized")
    tiles = _gallery_tiles(seg, dataset.referents, scenes, config.gt_rule, out / "overlays")
    sets, set_tiles = None, []
    if seg.model.target_head is not None:
        sets, set_tiles = run_sets(seg, scenes, out / "overlays-sets")
    tiles += set_tiles
    summary = {
        "real": real_scores,
        "held_out": {"split": "test", "seed": SYNTH_SEED, "refs": eval_refs, "expressions": len(dataset)},
        "oIoU": scores["oIoU"],
        "mIoU": scores["mIoU"],
        "by_level": scores.get("by_level", {}),
        "sets": sets,
        "gallery": [{k: v for k, v in t.items() if k != "image"} for t in real_tiles + tiles],
        "seconds": round(time.perf_counter() - start, 1),
    }
    save_png(out / "gallery.png", _gallery_png(real_tiles[:REAL_IN_PNG] + tiles, summary))
    page = _gallery_html(real_tiles, tiles, summary)
    atomic_write(out / "index.html", lambda tmp: Path(tmp).write_text(page))
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return summary


def _gallery_tiles(seg: Segmenter, referents: list, scenes: int, rule: str, folder: Path) -> list[dict]:
    """Overlays (prediction tinted, ground truth outlined in green) of every ref of the first `scenes` images,
    one expression per ref, predicted in one batch per image."""
    from lgformer.data.sources import referent_mask

    by_image: dict[Any, list] = defaultdict(list)
    for ref in referents:
        by_image[ref.image_id].append(ref)
    tiles = []
    for image_id in list(by_image)[:scenes]:
        refs = by_image[image_id]
        picture = read_image(refs[0].image)
        predictions = seg.predict(picture, [ref.sentences[0].text for ref in refs])
        for k, (ref, pred) in enumerate(zip(refs, predictions), start=1):
            truth = referent_mask(ref, rule)
            union = (pred.mask | truth).sum()
            iou = float((pred.mask & truth).sum() / union) if union else 0.0
            kind = f"level {ref.level} ({LEVELS.get(ref.level, '?')})" if ref.level else "real sentence"
            note = f"{kind}  IoU {iou:.2f}"
            image = overlay(picture, pred.mask, pred.sentence, note, truth=truth)
            path = save_png(folder / f"{refs[0].image.stem}_{k}.png", image)
            tiles.append(
                {
                    "image": image,
                    "file": f"{folder.name}/{path.name}",
                    "sentence": pred.sentence,
                    "level": ref.level or "real",
                    "iou": round(iou, 4),
                    "score": round(pred.score, 4),
                }
            )
    return tiles


def run_sets(seg: Segmenter, scenes: int, folder: Path) -> tuple[dict[str, Any], list[dict]]:
    """The plural and absent expressions of the first `scenes` held-out scenes (the generalized benchmark's
    scenes, each given one of each kind where the grammar has one): the plural ones' mean IoU against the
    union of their objects, the share of absent ones answered "nothing matches", and an overlay of each."""
    from lgformer.data.masks import decode_segmentation
    from lgformer.data.synth.generate import REFS_PER_SCENE, make_scene

    tiles: list[dict] = []
    plural_ious: list[float] = []
    answered: list[bool] = []
    for index in range(scenes):
        scene = make_scene(SYNTH_SEED, "test", index, SYNTH_SIZE, REFS_PER_SCENE, plural=1.0, absent=1.0)
        if not scene.sets:
            continue
        picture = Image.open(io.BytesIO(scene.jpeg)).convert("RGB")
        predictions = seg.predict(picture, [texts[0] for _, texts in scene.sets])
        for (members, _), pred in zip(scene.sets, predictions):
            truth = np.zeros((SYNTH_SIZE, SYNTH_SIZE), dtype=bool)
            for i in members:
                truth |= decode_segmentation(scene.masks[i], SYNTH_SIZE, SYNTH_SIZE, "union", scene.file_name)
            if members:
                union = (pred.mask | truth).sum()
                iou = float((pred.mask & truth).sum() / union) if union else 0.0
                plural_ious.append(iou)
                kind, note = "plural", f"plural ({len(members)} objects)  IoU {iou:.2f}"
            else:
                iou = float(not pred.mask.any())  # the GRES convention: an empty answer is exact
                answered.append(pred.no_target)
                said = "nothing matches" if pred.no_target else "a mask"
                kind, note = "no target", f"no target; answered {said} (match p {pred.target_score:.2f})"
            image = overlay(picture, pred.mask, pred.sentence, note, truth=truth)
            path = save_png(folder / f"{Path(scene.file_name).stem}_{kind.replace(' ', '-')}.png", image)
            tiles.append(
                {
                    "image": image,
                    "file": f"{folder.name}/{path.name}",
                    "sentence": pred.sentence,
                    "level": kind,
                    "iou": round(iou, 4),
                    "score": round(pred.score, 4),
                }
            )
    summary = {
        "scenes": scenes,
        "plural": len(plural_ious),
        "plural_mIoU": round(100 * float(np.mean(plural_ious)), 2) if plural_ious else None,
        "absent": len(answered),
        "nothing_matches": sum(answered),
    }
    return summary, tiles


def level_rows(summary: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """(level, expressions, oIoU, mIoU) per level present, then `all`: what is printed and drawn."""
    rows = [
        (f"{level} ({LEVELS.get(int(level), '?')})", r["sentences"], r["oIoU"], r["mIoU"])
        for level, r in summary["by_level"].items()
        if r["sentences"]
    ]
    return [*rows, ("all", summary["held_out"]["expressions"], summary["oIoU"], summary["mIoU"])]


def level_table(summary: dict[str, Any]) -> list[str]:
    """`level_rows` as aligned text lines under a header."""
    lines = [f"{'level':<40} {'expressions':>11} {'oIoU':>6} {'mIoU':>6}"]
    return lines + [f"{n:<40} {k:>11} {o:>6.1f} {m:>6.1f}" for n, k, o, m in level_rows(summary)]


def _gallery_png(tiles: list[dict], summary: dict[str, Any], columns: int = 6) -> Image.Image:
    """One page: the per-level table, then the overlays in rows of `columns` (two scenes a row)."""
    font = ImageFont.load_default(size=16)
    title = (
        f"LGFormer demo. Red: the model's mask; green outline: the ground truth. Held-out synthetic split: "
        f"{summary['held_out']['expressions']} expressions (test split of seed {SYNTH_SEED}), in %:"
    )
    table = [("level", "expressions", "oIoU", "mIoU")]
    if summary["real"]:
        r = summary["real"]
        table.append(
            ("real photos: RefCOCO sentences", str(r["sentences"]), f"{r['oIoU']:.1f}", f"{r['mIoU']:.1f}")
        )
    table += [(n, str(k), f"{o:.1f}", f"{m:.1f}") for n, k, o, m in level_rows(summary)]
    stops = (20, 360, 470, 550)  # column x positions (the default font is proportional)
    top = 16 + 24 + 21 * len(table) + 10
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (TILE + 6) + 6, top + rows * (TILE + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 12), title, fill=(0, 0, 0), font=font)
    for r, cells in enumerate(table):
        for x, cell in zip(stops, cells):
            colour = (0, 0, 0) if r == 0 or cells[0] == "all" else (50, 50, 50)
            draw.text((x, 40 + 21 * r), cell, fill=colour, font=font)
    for k, tile in enumerate(tiles):
        x, y = 6 + (k % columns) * (TILE + 6), top + (k // columns) * (TILE + 6)
        sheet.paste(ImageOps.pad(tile["image"], (TILE, TILE), Image.BILINEAR, color=(255, 255, 255)), (x, y))
    return sheet


def _figures(tiles: list[dict]) -> str:
    return "".join(
        f"<figure><img src='{t['file']}' alt='overlay'><figcaption>&ldquo;{html.escape(t['sentence'])}&rdquo;"
        f"<br>{'level ' if isinstance(t['level'], int) else ''}{t['level']}, IoU {t['iou']:.2f}, "
        f"score {t['score']:.2f}</figcaption></figure>"
        for t in tiles
    )


def _real_html(real: dict[str, Any] | None, tiles: list[dict]) -> str:
    if real is None:
        return ""
    return f"""<h2>Real photos</h2>
<p>{real["sentences"]} real RefCOCO / RefCOCO+ / RefCOCOg sentences on {real["photos"]} COCO photos the model
never trained on, scored at the photos' own size (<code>original</code> protocol): oIoU {real["oIoU"]:.1f},
mIoU {real["mIoU"]:.1f}, P@0.5 {real["P@0.5"]:.1f}. Below, the first sentence of each referent.</p>
{_figures(tiles)}
<h2>Synthetic scenes</h2>
"""


def sets_line(sets: dict[str, Any]) -> str:
    """The plural and absent expressions' result in one sentence (printed and on the page)."""
    plural = f"mean IoU {sets['plural_mIoU']:.1f}" if sets["plural"] else "none made"
    return (
        f'{sets["absent"]} expressions naming nothing, answered "nothing matches" {sets["nothing_matches"]} '
        f"times; {sets['plural']} naming several objects, {plural} (first {sets['scenes']} held-out scenes)"
    )


def _sets_html(sets: dict[str, Any] | None, tiles: list[dict]) -> str:
    if sets is None:
        return ""
    return f"""<h2>Nothing matches / all of these</h2>
<p>The model has the no-target head. {html.escape(sets_line(sets))}.</p>
{_figures(tiles)}
"""


def _gallery_html(real_tiles: list[dict], tiles: list[dict], summary: dict[str, Any]) -> str:
    set_tiles = [t for t in tiles if not isinstance(t["level"], int)]
    tiles = [t for t in tiles if isinstance(t["level"], int)]
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{k}</td><td>{o:.1f}</td><td>{m:.1f}</td></tr>"
        for n, k, o, m in level_rows(summary)
    )
    figures = _figures(tiles)
    held = summary["held_out"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LGFormer demo</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
figure {{ display: inline-block; margin: 6px; width: {TILE}px; vertical-align: top; }}
figure img {{ width: {TILE}px; }} figcaption {{ font-size: 13px; }}
</style></head><body>
<h1>LGFormer demo</h1>
<p>Red: the model's mask; green outline: the ground truth.</p>
{_real_html(summary["real"], real_tiles)}<p>Held-out synthetic split:
{held["expressions"]} expressions of {held["refs"]} objects (test split of seed {held["seed"]}),
scored with the engine's evaluator (in %).</p>
<table><tr><th>level</th><th>expressions</th><th>oIoU</th><th>mIoU</th></tr>{rows}</table>
<p><a href="gallery.png">gallery.png</a> (this page as one picture)</p>
{figures}
{_sets_html(summary["sets"], set_tiles)}</body></html>
"""


def train_default(
    out: Path,
    *,
    steps: int,
    train_refs: int,
    val_refs: int,
    device: str = "auto",
    workers: int = 1,
    overrides: tuple[str, ...] = (),
) -> Path:
    """Retrain the default model from scratch into `out/run` (continuing a run found there), then store its
    best weights like the shipped model in `out/model`; returns that folder."""
    from lgformer import config as config_mod
    from lgformer.data.synth.generate import generate
    from lgformer.engine.train import train

    data = out / "train-data"
    generate(data, {"train": train_refs, "val": val_refs}, SYNTH_SEED, SYNTH_SIZE, workers)
    settings = (
        f"data.root={data.resolve()}",
        "data.dataset=synth",
        f"train.max_steps={steps}",
        "train.val_split=val",
        *TRAIN_SETTINGS,
        *overrides,
    )
    cfg = config_mod.load("lite", settings)
    run = out / "run"
    resume = (run / "last").is_dir()
    if resume:
        print(f"continuing the training run in {run}")
    result = train(cfg, run, resume=resume, device=device)
    best = run / "best" if (run / "best").is_dir() else result.last
    return store_like_shipped(best, out / "model")


def store_like_shipped(
    checkpoint: Path, target: Path, source: str | None = None, overrides: tuple[str, ...] = ()
) -> Path:
    """Write a training checkpoint as the shipped model is stored: fp16 safetensors without what the trainer
    left out (the frozen MiniLM), config.json with the run's metadata (and `source`, the recipe, if given)
    and its config with `overrides` (fields that do not change the weights, e.g. the precision policy)."""
    import torch

    from lgformer.checkpoint import load_model, read_config, save_model

    model, cfg = load_model(checkpoint, overrides=overrides)
    _, meta = read_config(checkpoint)
    exclude = tuple(meta.pop("weights_exclude"))
    meta.pop("format_version")
    if source is not None:
        meta["source"] = source
    return save_model(target, model, cfg, dtype=torch.float16, exclude=exclude, extra=meta)
