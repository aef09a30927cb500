"""Pictures of a prediction: the overlay (mask tinted, outlined, the sentence written on it) and the mask PNG,
both at the image's original size, and atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from lgformer.files import atomic_write

TINT = (255, 40, 40)  # the predicted mask, blended in
OUTLINE = (255, 225, 0)  # its outline: yellow reads on red, on photos and on the synthetic scenes
TRUTH = (40, 230, 90)  # ground-truth outline, where one is known (demo)
ALPHA = 0.45
MAX_LINES = 3  # caption lines before an ellipsis (a 500-word sentence must not cover the picture)


def overlay(
    image: Image.Image,
    mask: np.ndarray,
    sentence: str,
    note: str | None = None,
    truth: np.ndarray | None = None,
) -> Image.Image:
    """`image` (RGB) with `mask` (bool, same size) tinted and outlined, an optional ground-truth outline,
    and a caption banner holding the sentence and a `note` (score, IoU, ...)."""
    pixels = np.asarray(image, dtype=np.float32).copy()
    pixels[mask] = (1 - ALPHA) * pixels[mask] + ALPHA * np.array(TINT, dtype=np.float32)
    width = max(2, round(min(image.size) / 160))
    pixels[_ring(mask, width)] = OUTLINE
    if truth is not None:
        pixels[_ring(truth, width)] = TRUTH
    out = Image.fromarray(pixels.round().astype(np.uint8))
    _caption(out, sentence, note)
    return out


def mask_image(mask: np.ndarray) -> Image.Image:
    """The mask as an 8-bit PNG-ready image: 255 on the object, 0 elsewhere."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def save_png(path: str | Path, image: Image.Image) -> Path:
    """Write `image` as PNG atomically (a reader never sees half a file)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return Path(path)


def _ring(mask: np.ndarray, width: int) -> np.ndarray:
    """A band `width` pixels wide just outside the mask, so the outline does not hide the tinted object."""
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * width + 1))
    return (np.asarray(grown) > 0) & ~mask


def _caption(image: Image.Image, sentence: str, note: str | None) -> None:
    """A darkened banner across the bottom (clear of viewers' toolbars and labels, which sit on top) with the
    sentence wrapped to the width, then the note."""
    w, h = image.size
    size = int(np.clip(round(w / 30), 13, 44))
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image)
    pad = max(3, size // 3)
    lines = _wrap(draw, f"\u201c{sentence}\u201d", font, w - 2 * pad)
    if note:
        lines.append(note)
    top = max(0, h - pad * 2 - len(lines) * (size + pad // 2))
    band = image.crop((0, top, w, h))
    image.paste(Image.eval(band, lambda v: v * 3 // 10), (0, top))
    for k, line in enumerate(lines):
        colour = (200, 200, 200) if note and k == len(lines) - 1 else (255, 255, 255)
        draw.text((pad, top + pad + k * (size + pad // 2)), line, fill=colour, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap by rendered width, at most MAX_LINES lines (the last one ellipsised)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    if len(lines) > MAX_LINES:
        last = lines[MAX_LINES - 1]
        while last and draw.textlength(last + " \u2026", font=font) > width:
            last = last[:-1]
        lines = [*lines[: MAX_LINES - 1], last.rstrip() + " \u2026"]
    return lines
