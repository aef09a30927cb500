"""Image decoding shared by every loader and the prediction code, and the authors' resize + normalisation.

Any PIL mode is decoded to 8-bit RGB: grayscale, palette (with or without transparency), RGBA/LA (alpha
dropped, as the authors' `convert("RGB")` does), CMYK and 16-bit grayscale (scaled 65535 -> 255, where a plain
`convert` would clip to white). Files above `MAX_PIXELS` are refused before decoding (decompression bombs);
missing, truncated or corrupt files raise `LGFormerError` naming the file.

EXIF orientation: COCO/REFER annotations (polygons, RLE, boxes) are in the stored-pixel frame, and the
authors' pipeline (PIL `open` + `convert("RGB")`) never applies the EXIF orientation tag, so the dataset
loaders do not either (`exif_transpose=False`, the default). The three refcoco-mini photos carry no EXIF
block at all; a rotated photo would still be caught by the loaders' check that the decoded size equals the
annotated size. Prediction on a user's own photo may pass `exif_transpose=True` to see it the way an image
viewer shows it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lgformer.errors import LGFormerError
from lgformer.model.common import IMAGENET_MEAN, IMAGENET_STD

MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192; below PIL's own bomb warning (89.5 M), so PIL never warns first
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(
    path: str | Path, *, max_pixels: int = MAX_PIXELS, exif_transpose: bool = False
) -> Image.Image:
    """Decode `path` to an RGB PIL image (see the module docstring for modes, limits and EXIF)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise LGFormerError(
                        f"{path}: {width}x{height} image exceeds the {max_pixels:,}-pixel limit "
                        "(decompression bomb?)"
                    )
                im.load()
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                return to_rgb(im, path)
    except FileNotFoundError:
        raise LGFormerError(f"image not found: {path}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LGFormerError(f"{path}: refused as a decompression bomb ({_first_line(exc)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise LGFormerError(f"{path}: cannot decode image ({_first_line(exc)})") from None


def to_rgb(im: Image.Image, path: Path) -> Image.Image:
    if im.mode in _SIXTEEN_BIT:
        values = np.asarray(im, dtype=np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im.copy()
    try:
        return im.convert("RGB")
    except ValueError:
        raise LGFormerError(f"{path}: unsupported image mode {im.mode!r}") from None


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Authors' transform (docs/architecture.md#inputs-image-and-ground-truth): PIL bilinear resize to size x
    size, [0, 1], ImageNet mean/std."""
    resized = image.resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Ground truth at the network size (docs/architecture.md#inputs-image-and-ground-truth): PIL nearest
    resize of the 0/1 mask, as float."""
    resized = Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.array(resized, dtype=np.uint8)).float()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
