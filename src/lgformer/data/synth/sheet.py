"""A sample sheet of a generated benchmark: scenes with their referents outlined and expressions written."""

from __future__ import annotations

import io
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lgformer.config import SYNTH
from lgformer.data.images import load_image
from lgformer.data.sources import Referent, load_refer, referent_mask
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write

OUTLINES = ((0, 230, 255), (255, 40, 220), (120, 255, 60))
TILE = 320
PANEL = 470
FONT_SIZE = 14
SENTENCES = 2  # per ref, to fit the tile


def render_sheet(
    root: str | Path, out: str | Path, scenes: int = 8, split: str = "val", columns: int = 2
) -> None:
    """Draw the first `scenes` scenes of `split`: each ref outlined in its colour, with its level and first
    sentences."""
    by_image: dict[object, list[Referent]] = defaultdict(list)
    for ref in load_refer(root, SYNTH, SYNTH):
        if ref.split == split:
            by_image[ref.image_id].append(ref)
    if not by_image:
        raise LGFormerError(f"{root}: no scenes in split {split!r} to draw")
    chosen = sorted(by_image)[:scenes]
    rows = -(-len(chosen) // columns)
    sheet = Image.new("RGB", (columns * (TILE + PANEL), rows * TILE), (255, 255, 255))
    font = ImageFont.load_default(size=FONT_SIZE)
    for k, image_id in enumerate(chosen):
        x, y = (k % columns) * (TILE + PANEL), (k // columns) * TILE
        sheet.paste(_tile(by_image[image_id]), (x, y))
        _caption(ImageDraw.Draw(sheet), by_image[image_id], x + TILE + 10, y + 8, font)
    buffer = io.BytesIO()  # a 256-colour palette keeps the README image small (~0.3 MB instead of 1.3 MB)
    sheet.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG", optimize=True)
    atomic_write(out, buffer.getvalue())


def _tile(refs: list[Referent]) -> Image.Image:
    picture = np.array(load_image(refs[0].image).resize((TILE, TILE), Image.BILINEAR))
    for k, ref in enumerate(refs):
        mask = np.array(Image.fromarray(referent_mask(ref, "union")).resize((TILE, TILE), Image.NEAREST))
        edge = mask & ~_erode(mask)
        thick = _dilate(_dilate(edge))
        picture[_dilate(thick) & ~thick] = 0
        picture[thick] = OUTLINES[k % len(OUTLINES)]
    return Image.fromarray(picture)


def _caption(
    draw: ImageDraw.ImageDraw, refs: list[Referent], x: int, y: int, font: ImageFont.FreeTypeFont
) -> None:
    draw.text((x, y), f"{refs[0].image.name}  (level {refs[0].level})", fill=(90, 90, 90), font=font)
    y += FONT_SIZE + 10
    for k, ref in enumerate(refs):
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=OUTLINES[k % len(OUTLINES)], outline=(0, 0, 0))
        for sentence in ref.sentences[:SENTENCES]:
            for j, line in enumerate(textwrap.wrap(sentence.text, width=58)):
                draw.text((x + 20 + (10 if j else 0), y), line, fill=(0, 0, 0), font=font)
                y += FONT_SIZE + 3
        y += 8


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
