"""load_image: every PIL mode to RGB, decompression-bomb limit, corrupt files, the EXIF decision."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lgformer.data import load_image
from lgformer.errors import LGFormerError


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def test_modes_decode_to_rgb(tmp_path: Path) -> None:
    gray = Image.fromarray(np.full((4, 6), 200, dtype=np.uint8))
    palette = gray.convert("P")
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    rgba = Image.new("RGBA", (6, 4), (10, 20, 30, 0))
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))  # pure red
    sixteen = Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16))
    cases = {
        "gray.png": (gray, (200, 200, 200)),
        "palette.png": (palette, (200, 200, 200)),
        "transparent.png": (transparent, (200, 200, 200)),
        "rgba.png": (rgba, (10, 20, 30)),
        "cmyk.jpg": (cmyk, (255, 0, 0)),
        "sixteen.png": (sixteen, (255, 255, 255)),
    }
    for name, (image, colour) in cases.items():
        loaded = load_image(_save(image, tmp_path / name))
        assert loaded.mode == "RGB" and loaded.size == (6, 4), name
        assert np.abs(np.array(loaded, dtype=int)[1, 1] - colour).max() <= 3, name


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    loaded = load_image(_save(Image.fromarray(values), tmp_path / "ramp.png"))
    assert np.array(loaded)[0, :, 0].tolist() == [0, 100, 255]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_refused(tmp_path: Path) -> None:
    huge = _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(LGFormerError, match=r"bomb\.png: .*(bomb|limit)"):
        load_image(huge)
    large = _png_header_only(tmp_path / "large.png", 9000, 9000)  # 81 M pixels: under PIL's limit, over ours
    with pytest.raises(LGFormerError, match=r"9000x9000 image exceeds the 67,108,864-pixel limit"):
        load_image(large)
    small = _save(Image.new("RGB", (20, 20)), tmp_path / "small.png")
    with pytest.raises(LGFormerError, match="exceeds the 100-pixel limit"):
        load_image(small, max_pixels=100)


def test_corrupt_and_missing_files_name_the_file(tmp_path: Path, shared_data: Path) -> None:
    photo = next((shared_data / "refcoco-mini" / "images").rglob("*.jpg"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photo.read_bytes()[:4000])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage):
        with pytest.raises(LGFormerError) as exc:
            load_image(path)
        assert str(exc.value).startswith(f"{path}: cannot decode image") and "\n" not in str(exc.value)
    with pytest.raises(LGFormerError, match="image not found: .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_exif_orientation_is_not_applied_by_default(tmp_path: Path, shared_data: Path) -> None:
    for photo in (shared_data / "refcoco-mini" / "images").rglob("*.jpg"):
        assert 0x0112 not in Image.open(photo).getexif()  # the real COCO photos carry no orientation tag
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.new("RGB", (30, 10), (0, 0, 255)), tmp_path / "rotated.jpg", exif=exif)
    assert load_image(path).size == (30, 10)  # stored pixels, the frame annotations use
    assert load_image(path, exif_transpose=True).size == (10, 30)
