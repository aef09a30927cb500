"""Ground-truth masks: COCO polygons / RLE decoded with pycocotools exactly as the REFER API does, mask PNGs.

REFER's `getMask` decodes every polygon of the annotation separately and sums the binary maps; the authors'
loader then keeps the pixels where that sum equals 1 (docs/architecture.md#inputs-image-and-ground-truth), so
pixels covered by two overlapping
polygons of one object become background. `exactly_one` (the default, for metric parity with the paper)
reproduces that quirk; `union` keeps every covered pixel. An RLE is a single map, identical under both rules.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from lgformer.config import check_rule
from lgformer.errors import LGFormerError


def decode_segmentation(seg: Any, height: int, width: int, rule: str, where: str) -> np.ndarray:
    """A COCO segmentation (polygon list, or RLE dict with compressed or list counts) -> bool (H, W)."""
    check_rule(rule)
    if isinstance(seg, dict):
        return _decode_rle(seg, height, width, where)
    if isinstance(seg, list):
        return _decode_polygons(seg, height, width, rule, where)
    raise LGFormerError(
        f"{where}: segmentation must be a list of polygons or an RLE dict, got {type(seg).__name__}"
    )


def _decode_polygons(polygons: list, height: int, width: int, rule: str, where: str) -> np.ndarray:
    valid = []
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(_is_number(v) for v in poly) or len(poly) % 2:
            raise LGFormerError(f"{where}: polygon {k} must be a flat list of x, y numbers")
        if len(poly) >= 6:  # fewer than three points enclose nothing
            valid.append([float(v) for v in poly])
    if not valid:
        return np.zeros((height, width), dtype=bool)
    maps = _decode(coco_mask.frPyObjects(valid, height, width))  # (H, W, n): one map per polygon
    coverage = maps.astype(np.int32).sum(axis=2)
    return coverage == 1 if rule == "exactly_one" else coverage > 0


def _decode_rle(rle: dict, height: int, width: int, where: str) -> np.ndarray:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise LGFormerError(f"{where}: RLE needs 'size': [height, width]")
    if size != [height, width]:
        raise LGFormerError(f"{where}: RLE size {size} differs from the image size [{height}, {width}]")
    if isinstance(counts, list):
        if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != height * width:
            raise LGFormerError(
                f"{where}: uncompressed RLE counts must be non-negative and sum to height*width"
            )
        compressed = coco_mask.frPyObjects({"size": size, "counts": counts}, height, width)
    elif isinstance(counts, (str, bytes)):
        compressed = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise LGFormerError(f"{where}: RLE 'counts' must be a string or a list of integers")
    try:
        return _decode(compressed).astype(bool)
    except (ValueError, UnicodeError) as exc:
        raise LGFormerError(f"{where}: cannot decode RLE ({exc})") from None


def _decode(rle: dict | list) -> np.ndarray:
    """pycocotools' decode, without the numpy-2 DeprecationWarning its compiled code raises on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        return coco_mask.decode(rle)


def encode_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> compressed COCO RLE {"size": [H, W], "counts": str} (JSON-ready)."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def read_mask_png(path: Path, where: str) -> np.ndarray:
    """A mask image -> bool (H, W): every nonzero pixel (palette index or gray level) is the object."""
    try:
        with Image.open(path) as im:
            im.load()
            values = np.asarray(im if im.mode in ("1", "L", "P", "I", "I;16") else im.convert("L"))
    except FileNotFoundError:
        raise LGFormerError(f"{where}: mask file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise LGFormerError(f"{where}: cannot decode mask {path} ({exc})") from None
    return values != 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
