"""Scenes of the synthetic benchmark: sampling objects, exact masks, and the rendered picture.

Objects are drawn in list order (later ones on top) on a textured, noisy background. Each object's mask is
its shape rasterised at pixel centres from its recorded centre and radius (`shape_mask`), and its ground
truth is the visible part: the mask minus every object drawn after it. Placement keeps every object at least
`MIN_VISIBLE` visible, so occlusion is partial.

Attribute sampling depends on the level a scene is made for, so that distractors share attributes with the
targets: level-1 scenes repeat colours and patterns across shapes; level-2 scenes repeat shapes with other
attributes; level-3 scenes hold identical twins (only a relation separates them) and level-4 scenes an
identical triplet, half of the time in a row (an ordinal or two relations are needed).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from lgformer.data.synth.grammar import COLORS, PATTERNS, SHAPES, SIZES, Obj

RGB = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 180),
    "orange": (250, 135, 20),
    "white": (245, 245, 240),
    "black": (25, 25, 25),
}
RADIUS = {"small": (0.055, 0.07), "large": (0.105, 0.13)}  # fractions of the image size
MIN_VISIBLE = 0.6  # every object keeps at least this share of its pixels visible
MIN_SEPARATION = 0.65  # centres at least this many (r1 + r2) apart
JPEG_QUALITY = 92


def shape_box(cx: float, cy: float, r: float, size: int) -> tuple[slice, slice]:
    """The rows and columns that can hold pixels of an object of radius r centred at (cx, cy)."""
    x0, x1 = max(0, math.floor(cx - r) - 1), min(size, math.ceil(cx + r) + 2)
    y0, y1 = max(0, math.floor(cy - r) - 1), min(size, math.ceil(cy + r) + 2)
    return slice(y0, y1), slice(x0, x1)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Pixels (centres) inside `shape` of radius r centred at (cx, cy): bool (size, size)."""
    rows, cols = shape_box(cx, cy, r, size)
    y0, y1, x0, x1 = rows.start, rows.stop, cols.start, cols.stop
    xs = (np.arange(x0, x1, dtype=np.float64) + 0.5 - cx) / r
    ys = (np.arange(y0, y1, dtype=np.float64) + 0.5 - cy) / r
    u, v = np.meshgrid(xs, ys)
    out = np.zeros((size, size), dtype=bool)
    out[y0:y1, x0:x1] = _inside(shape, u, v)
    return out


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Unit shapes in local coordinates (u right, v down, radius 1)."""
    rho2 = u * u + v * v
    if shape == "circle":
        return rho2 <= 1.0
    if shape == "ring":
        return (rho2 <= 1.0) & (rho2 >= 0.52**2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "triangle":  # equilateral, apex up, vertically centred
        return (v <= 0.85) & (math.sqrt(3) * np.abs(u) <= v + 0.85)
    if shape == "star":
        return _star(u, v, inner=0.45)
    if shape == "heart":
        x, y = u * 1.14, -(v * 1.14) + 0.12
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


def _star(u: np.ndarray, v: np.ndarray, inner: float) -> np.ndarray:
    """Five-pointed star, one tip up: fold every point into the half-sector between a tip and an inner corner
    and test it against that edge."""
    rho = np.sqrt(u * u + v * v)
    phi = np.degrees(np.arctan2(u, -v)) % 72.0
    alpha = np.radians(np.minimum(phi, 72.0 - phi))
    qx, qy = rho * np.cos(alpha), rho * np.sin(alpha)
    ex, ey = inner * math.cos(math.radians(36)) - 1.0, inner * math.sin(math.radians(36))
    return ex * qy - ey * (qx - 1.0) >= 0.0  # same side of the edge tip -> inner corner as the centre


def visible_masks(full: list[np.ndarray]) -> list[np.ndarray]:
    """The visible pixels of every object: its shape mask minus the masks of everything drawn after it."""
    covered = np.zeros_like(full[0])
    visible: list[np.ndarray] = [covered] * len(full)
    for i in range(len(full) - 1, -1, -1):
        visible[i] = full[i] & ~covered
        covered = covered | full[i]
    return visible


# ---------------------------------------------------------------------------------------------- sampling


def sample_objects(
    rng: np.random.Generator, plan: int, size: int
) -> tuple[list[Obj], list[np.ndarray], list[np.ndarray]] | None:
    """Objects for a scene made for level `plan`, placed so that each keeps `MIN_VISIBLE` of its pixels, with
    their shape and visible masks. None if the placement failed (the caller draws another scene)."""
    protos, row = _prototypes(rng, plan)
    order = rng.permutation(len(protos))
    protos = [protos[i] for i in order]
    row_members = [k for k, i in enumerate(order) if i in row]
    radii = [float(rng.uniform(*RADIUS[p[2]])) * size for p in protos]
    centres = _place(rng, radii, row_members, size)
    if centres is None:
        return None
    objs = [
        Obj(shape, color, sz, pattern, round(cx, 1), round(cy, 1), round(r, 1))
        for (shape, color, sz, pattern), (cx, cy), r in zip(protos, centres, radii)
    ]
    full = [shape_mask(o.shape, o.cx, o.cy, o.r, size) for o in objs]
    visible = visible_masks(full)
    if any(np.count_nonzero(vis) < MIN_VISIBLE * np.count_nonzero(f) for vis, f in zip(visible, full)):
        return None
    return objs, full, visible


def _prototypes(rng: np.random.Generator, plan: int) -> tuple[list[tuple[str, str, str, str]], set[int]]:
    """(shape, colour, size, pattern) per object, and the indices to lay out in a row."""
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colors = [COLORS[i] for i in rng.permutation(len(COLORS))]
    patterns = [PATTERNS[i] for i in rng.permutation(len(PATTERNS))]

    def attrs(n_colors: int, n_patterns: int) -> tuple[str, str, str]:
        return (
            colors[int(rng.integers(n_colors))],
            SIZES[int(rng.integers(2))],
            patterns[int(rng.integers(n_patterns))],
        )

    protos: list[tuple[str, str, str, str]] = []
    row: set[int] = set()
    if plan == 1:  # several unique shapes, all in one or two colours; some shapes repeated
        for s in shapes[: int(rng.integers(3, 6))]:
            protos.append((s, *attrs(2, 2)))
        for _ in range(int(rng.integers(0, 3))):
            protos.append((shapes[5], *attrs(2, 2)))
    elif plan == 2:  # two or three shapes, each two or three times with different attributes
        for s in shapes[: int(rng.integers(2, 4))]:
            seen: set[tuple[str, str, str]] = set()
            for _ in range(int(rng.integers(2, 4))):
                a = attrs(3, 3)
                if a not in seen:
                    seen.add(a)
                    protos.append((s, *a))
    elif plan == 3:  # identical twins, plus unique landmarks
        for s in shapes[: int(rng.integers(2, 4))]:
            a = attrs(3, 2)
            protos += [(s, *a), (s, *a)]
        for s in shapes[4 : 4 + int(rng.integers(1, 3))]:
            protos.append((s, *attrs(len(COLORS), 3)))
    else:  # an identical triplet (in a row or scattered), an identical pair, and landmarks
        a = attrs(3, 2)
        row = {0, 1, 2} if rng.random() < 0.5 else set()
        protos += [(shapes[0], *a)] * 3
        if rng.random() < 0.6:
            b = attrs(3, 2)
            protos += [(shapes[int(rng.integers(0, 2))], *b)] * 2
        for s in shapes[4 : 4 + int(rng.integers(1, 4))]:
            protos.append((s, *attrs(len(COLORS), 3)))
    return protos, row


def _place(
    rng: np.random.Generator, radii: list[float], row: list[int], size: int
) -> list[tuple[float, float]] | None:
    centres: dict[int, tuple[float, float]] = {}
    if row:
        horizontal = rng.random() < 0.5
        r = max(radii[i] for i in row)
        step = float(rng.uniform(2.3, 3.2)) * r
        span = step * (len(row) - 1)
        along0 = float(rng.uniform(r + 2, size - r - 2 - span)) if size - 2 * r - 4 > span else None
        if along0 is None:
            return None
        across = float(rng.uniform(r + 2, size - r - 2))
        for k, i in enumerate(row):
            a = along0 + k * step
            c = across + float(rng.uniform(-0.3, 0.3)) * r
            centres[i] = (a, c) if horizontal else (c, a)
    for i, r in enumerate(radii):
        if i in centres:
            continue
        for _ in range(60):
            c = (float(rng.uniform(r + 2, size - r - 2)), float(rng.uniform(r + 2, size - r - 2)))
            if all(math.dist(c, p) >= MIN_SEPARATION * (r + radii[j]) for j, p in centres.items()):
                centres[i] = c
                break
        else:
            return None
    return [centres[i] for i in range(len(radii))]


# --------------------------------------------------------------------------------------------- rendering


def render_image(rng: np.random.Generator, objs: list[Obj], full: list[np.ndarray], size: int) -> np.ndarray:
    """The picture, uint8 (size, size, 3): textured background, patterned objects in order, sensor noise."""
    image = _background(rng, size)
    period = max(6.0, size / 40.0)
    for obj, mask in zip(objs, full):
        base = np.clip(np.array(RGB[obj.color], dtype=np.float32) + rng.normal(0, 7, 3), 0, 255)
        luminance = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
        second = base * 0.55 if luminance > 110 else base + 0.5 * (255 - base)
        rows, cols = shape_box(obj.cx, obj.cy, obj.r, size)
        inside = mask[rows, cols]
        ys, xs = np.nonzero(inside)
        u = xs + np.float32(cols.start + 0.5 - obj.cx)
        v = ys + np.float32(rows.start + 0.5 - obj.cy)
        if obj.pattern == "striped":
            alt = np.floor((u + v) / period) % 2 == 0
        elif obj.pattern == "dotted":
            du, dv = (u % period) - period / 2, (v % period) - period / 2
            alt = du * du + dv * dv <= (0.3 * period) ** 2
        elif obj.pattern == "checked":
            cell = 0.75 * period
            alt = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
        else:
            alt = np.zeros(u.shape, dtype=bool)
        image[rows, cols][inside] = np.where(alt[:, None], second, base)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    np.clip(image, 0, 255, out=image)
    return (image + 0.5).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation mottled gray (a luminance field, a weaker one per channel) and a faint wave texture."""
    gray = float(rng.uniform(95, 165))
    tint = rng.normal(0, 8, 3).astype(np.float32)
    luminance = _smooth_noise(rng, size, 6, 14.0)
    image = np.stack([_smooth_noise(rng, size, 6, 6.0) for _ in range(3)], axis=-1)
    coords = np.arange(size, dtype=np.float32)
    theta, freq = float(rng.uniform(0, math.pi)), float(rng.uniform(0.05, 0.25))
    wave = np.float32(rng.uniform(1, 5)) * np.sin(
        np.float32(freq)
        * (coords[None, :] * np.float32(math.cos(theta)) + coords[:, None] * np.float32(math.sin(theta)))
    )
    image += (luminance + wave + np.float32(gray))[..., None]
    image += tint
    return image


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, sigma: float) -> np.ndarray:
    coarse = Image.fromarray(rng.normal(0, sigma, (cells, cells)).astype(np.float32))
    return np.array(coarse.resize((size, size), Image.BILINEAR))


def encode_jpeg(image: np.ndarray) -> bytes:
    """Fixed encoder settings (quality, 4:4:4, no optimisation, baseline) so files are byte-identical."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buffer.getvalue()
