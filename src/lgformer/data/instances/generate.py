"""`lgformer data from-instances`: a referring dataset in the REFER layout from any COCO-format
instance-segmentation set (COCO, LVIS, your own labelled photos).

    OUT/images/instances/<file>.jpg   the photos (copied), and for `train` their mirrored and copy-pasted
                                      variants (<stem>_flip.jpg, <stem>_paste<k>.jpg)
    OUT/instances/instances.json      images, annotations (RLE of each object as it is seen in that picture,
                                      with its computed attributes under "attributes"), categories
    OUT/instances/refs(instances).p   REFER refs (protocol 2) with sentences and the level of each ref

The scene graph of a picture is its instances (crowd ones and those under `min_area` of the picture
dropped), each with its category, a colour name when one clearly dominates its pixels, its size against the
others of its category and its box (centre and radius for relations and ordinals). Expressions are made by
the synthetic benchmark's grammar with the real-photo lexicon (`lexicon.py`) and kept only when its
interpreter, reading the text back, finds exactly the referent. Variants are made before their expressions,
so a mirrored photo's "left" is its own left, and a copy-pasted scene (Ghiasi et al., CVPR 2021: instances of
other training photos pasted in, the objects they cover updated) is a new verified scene. Donors come from
the `train` split only. Everything derives from (seed, image index, variant): same seed, same bytes.

With `plural` / `absent` shares (gRefCOCO's kinds, `--generalized`), each picture also gets, from a random
stream of its own (its classic refs stay byte for byte what they were), refs naming several objects ("both
dogs", "all the white cars": `ann_id` the list of their annotations) and refs naming nothing that come close
to something there ("the red car" where the one car is white; "the white cat" beside a white dog in a
picture without a cat, the noun swapped for one of the same supercategory that no annotation of the picture
has). The picture's unlabelled-for-reference instances (crowds, ones under `min_area`) stay in the scene
graph for these, attributes unknown: a set that would include one, or an absent description one might fit,
is never said.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lgformer.config import INSTANCES
from lgformer.data.images import load_image
from lgformer.data.instances.lexicon import color_name, lexicon, size_names
from lgformer.data.masks import decode_segmentation, encode_rle
from lgformer.data.sources import read_json
from lgformer.data.synth.describe import describe, describe_absent, describe_plural
from lgformer.data.synth.generate import deterministic_pickle, refer_ref
from lgformer.data.synth.grammar import UNKNOWN, Lexicon, Obj, level, min_level, parse
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write

SENTENCES_PER_REF = 3
MAX_SHARE = 0.2  # of the plural and of the absent refs each, among all refs
MAX_OWED = 3.0  # at most this many refs of a kind are passed on to the next pictures
KEEP_VISIBLE = 0.7  # a paste must leave every object at least this share of its pixels
PASTE_SCALE = (0.6, 1.4)
JPEG_QUALITY = 92
TRAIN = "train"


@dataclass
class Instance:
    """One object of a picture: its annotation id (of the source set), category and mask."""

    ann_id: int
    category: str
    mask: np.ndarray  # bool (H, W)


@dataclass
class Picture:
    """A picture with its kept instances; `source` names the source image for the variants."""

    file_name: str
    split: str
    pixels: np.ndarray  # uint8 (H, W, 3)
    instances: list[Instance]
    source: int  # index of the source image
    variant: str = ""  # "" (the photo itself), "flip", "paste<k>"
    hidden: list[Instance] = field(default_factory=list)  # crowds and specks: there, never described


class InstanceSet:
    """A COCO-format instances.json and its image folder, validated on load: every error names the file and
    the image or annotation id."""

    def __init__(
        self, instances: str | Path, images: str | Path, splits: str | Path | None, min_area: float
    ) -> None:
        self.path, self.image_dir = Path(instances), Path(images)
        data = read_json(self.path)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in _SECTIONS):
            raise LGFormerError(f"{self.path}: expected a COCO object with lists {', '.join(_SECTIONS)}")
        self.categories: dict[int, str] = {}
        self.supercategories: dict[str, str] = {}  # name -> supercategory ("" when the set gives none)
        for k, cat in enumerate(data["categories"]):
            _need(cat, ("id", "name"), f"{self.path}: categories[{k}]")
            self.categories[cat["id"]] = str(cat["name"])
            self.supercategories[str(cat["name"])] = str(cat.get("supercategory") or "")
        self.images: list[dict] = []
        by_id: dict[Any, dict] = {}
        for k, image in enumerate(data["images"]):
            _need(image, ("id", "file_name", "height", "width"), f"{self.path}: images[{k}]")
            by_id[image["id"]] = image
            self.images.append(image)
        self.anns: dict[Any, list[dict]] = {image["id"]: [] for image in self.images}
        for k, ann in enumerate(data["annotations"]):
            where = f"{self.path}: annotation {ann.get('id', f'#{k}') if isinstance(ann, dict) else f'#{k}'}"
            _need(ann, ("id", "image_id", "category_id", "segmentation"), where)
            if ann["category_id"] not in self.categories:
                raise LGFormerError(f"{where}: unknown category_id {ann['category_id']!r}")
            image = by_id.get(ann["image_id"])
            if image is None:
                raise LGFormerError(f"{where}: unknown image_id {ann['image_id']!r}")
            _check_polygons(ann["segmentation"], image, where)
            self.anns[image["id"]].append(ann)
        self.split_of = self._splits(splits)
        self.min_area = min_area
        for image in self.images:
            if not (self.image_dir / image["file_name"]).is_file():
                first = self.anns[image["id"]][0]["id"] if self.anns[image["id"]] else None
                raise LGFormerError(
                    f"{self.image_dir / image['file_name']}: image file not found (image {image['id']}"
                    f"{f', annotation {first}' if first is not None else ''} of {self.path})"
                )

    def _splits(self, splits: str | Path | None) -> list[str]:
        if splits is None:
            return [TRAIN] * len(self.images)
        table = read_json(Path(splits))
        if not isinstance(table, dict):
            raise LGFormerError(f"{splits}: expected an object file_name -> split")
        out = []
        for image in self.images:
            split = table.get(image["file_name"])
            if not isinstance(split, str) or not split:
                raise LGFormerError(f"{splits}: no split for {image['file_name']} (image {image['id']})")
            out.append(split)
        return out

    def picture(self, index: int) -> Picture:
        """Image `index` with its kept instances (crowd and tiny ones dropped)."""
        image = self.images[index]
        path = self.image_dir / image["file_name"]
        pixels = np.array(load_image(path))
        height, width = int(image["height"]), int(image["width"])
        if pixels.shape[:2] != (height, width):
            raise LGFormerError(
                f"{path}: decoded image is {pixels.shape[1]}x{pixels.shape[0]} but {self.path} declares "
                f"{width}x{height} (image {image['id']})"
            )
        kept, hidden = [], []
        for ann in self.anns[image["id"]]:
            where = f"{self.path}: annotation {ann['id']}"
            mask = decode_segmentation(ann["segmentation"], height, width, "union", where)
            instance = Instance(ann["id"], self.categories[ann["category_id"]], mask)
            if ann.get("iscrowd", 0) or mask.sum() < self.min_area * height * width:
                hidden.append(instance)
            else:
                kept.append(instance)
        return Picture(image["file_name"], self.split_of[index], pixels, kept, index, hidden=hidden)


_SECTIONS = ("images", "annotations", "categories")


def _need(record: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(record, dict):
        raise LGFormerError(f"{where}: expected an object")
    missing = [f for f in fields if f not in record]
    if missing:
        raise LGFormerError(f"{where}: missing field {missing[0]!r}")


def _check_polygons(seg: Any, image: dict, where: str) -> None:
    """Polygon points must lie in the image (a pixel of slack for rounding)."""
    if not isinstance(seg, list):
        return
    width, height = float(image["width"]), float(image["height"])
    for poly in seg:
        if not isinstance(poly, list) or len(poly) % 2:
            raise LGFormerError(f"{where}: segmentation polygons must be flat lists of x, y numbers")
        for x, y in zip(poly[::2], poly[1::2]):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y)):
                raise LGFormerError(f"{where}: segmentation polygons must be flat lists of x, y numbers")
            if not (-1 <= x <= width + 1 and -1 <= y <= height + 1):
                raise LGFormerError(
                    f"{where}: polygon point ({x}, {y}) lies outside the {int(width)}x{int(height)} image "
                    f"{image['file_name']}"
                )


# ------------------------------------------------------------------------------------------ scene graphs


def scene_objects(picture: Picture) -> list[Obj]:
    """The scene graph of a picture: category, colour, size; box centre and radius (half the geometric mean
    of the box sides) for relations and ordinals."""
    areas = [float(inst.mask.sum()) for inst in picture.instances]
    sizes = size_names([inst.category for inst in picture.instances], areas)
    objs = []
    for inst, size in zip(picture.instances, sizes):
        ys, xs = np.nonzero(inst.mask)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        color = color_name(picture.pixels[inst.mask])
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = 0.5 * math.sqrt(float((x1 - x0) * (y1 - y0)))
        objs.append(Obj(inst.category, color, size, UNKNOWN, round(cx, 1), round(cy, 1), round(r, 1)))
    return objs


def hidden_objects(picture: Picture) -> list[Obj]:
    """The picture's crowds and specks as scene-graph objects whose colour and size are unknown (where their
    mask is empty, as a crowd region covered by pastes, they stand nowhere: centre -1, -1)."""
    objs = []
    for inst in picture.hidden:
        ys, xs = np.nonzero(inst.mask)
        if len(xs) == 0:
            objs.append(Obj(inst.category, UNKNOWN, UNKNOWN, UNKNOWN, -1.0, -1.0, 0.0))
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        r = 0.5 * math.sqrt(float((x1 - x0) * (y1 - y0)))
        objs.append(
            Obj(
                inst.category,
                UNKNOWN,
                UNKNOWN,
                UNKNOWN,
                round((x0 + x1) / 2, 1),
                round((y0 + y1) / 2, 1),
                round(r, 1),
            )
        )
    return objs


def refer_refs(
    objs: list[Obj],
    lex: Lexicon,
    rng: np.random.Generator,
    per_object: int,
    referents: list[bool] | None = None,
) -> list[tuple[int, int, list[str]]]:
    """(object index, level, sentences) for up to `per_object` refs of every object (of those `referents`
    marks; all by default; the others are distractors and landmarks), each at another level from the lowest
    that identifies it, the levels this picture has fewest of first."""
    counts: Counter[int] = Counter()
    refs = []
    for i in rng.permutation(len(objs)).tolist():
        if referents is not None and not referents[i]:
            continue
        levels = list(range(min_level(i, objs, lex), 5))
        ties = rng.random(len(levels))
        made = 0
        for _, _, lvl in sorted(zip([counts[v] for v in levels], ties, levels)):
            texts = describe(i, objs, lvl, rng, SENTENCES_PER_REF, lex)
            if texts:
                refs.append((i, lvl, texts))
                counts[lvl] += 1
                made += 1
                if made == per_object:
                    break
    return sorted(refs)


def set_refs(
    objs: list[Obj],
    hidden: list[Obj],
    lex: Lexicon,
    rng: np.random.Generator,
    expected: tuple[float, float],
    swaps: Mapping[str, Sequence[str]],
) -> list[tuple[tuple[int, ...], int, list[str]]]:
    """(objects, level, sentences) of the picture's plural refs and absent ones (no objects), about
    `expected` = (plural, absent) of each: the whole part always, the fraction with that probability."""
    if not objs:
        return []
    graph = objs + hidden  # the hidden ones count when the interpreter checks a set or an absence
    made: list[tuple[tuple[int, ...], int, list[str]]] = []
    for kind, mean in zip(("plural", "absent"), expected):
        for _ in range(int(mean) + (rng.random() < mean - int(mean))):
            if kind == "plural":
                found = describe_plural(graph, rng, SENTENCES_PER_REF, lex, named=len(objs), at_least=1)
            else:
                texts = describe_absent(graph, rng, SENTENCES_PER_REF, lex, swaps, len(objs), at_least=1)
                found = None if texts is None else ((), texts)
            if found is not None and all(found[0] != members for members, _, _ in made):
                made.append((found[0], level(parse(found[1][0], lex), lex), found[1]))
    return made


def absent_nouns(picture: Picture, supercategories: Mapping[str, str], lex: Lexicon) -> dict[str, list[str]]:
    """For each category in the picture, the categories of its supercategory that no annotation of the
    picture has (its kept and hidden instances): the nouns an absent description may swap in."""
    present = {inst.category for inst in picture.instances + picture.hidden}
    return {
        name: [
            other
            for other in sorted(lex.nouns)
            if other not in present and supercategories.get(other) == supercategories.get(name)
        ]
        for name in present
    }


# ---------------------------------------------------------------------------------------------- variants


def flipped(picture: Picture) -> Picture:
    """The mirror image: pixels and masks flipped left-right (expressions are made after, from it)."""
    return Picture(
        _variant_name(picture.file_name, "flip"),
        picture.split,
        picture.pixels[:, ::-1].copy(),
        [Instance(i.ann_id, i.category, i.mask[:, ::-1].copy()) for i in picture.instances],
        picture.source,
        "flip",
        [Instance(i.ann_id, i.category, i.mask[:, ::-1].copy()) for i in picture.hidden],
    )


def pasted(
    picture: Picture, donors: list[Instance], donor_pixels: list[np.ndarray], rng: np.random.Generator, k: int
) -> Picture:
    """Simple copy-paste: each donor instance (scaled, maybe mirrored) is pasted where it leaves every object
    already there at least KEEP_VISIBLE of its pixels; covered pixels leave the objects' masks."""
    pixels = picture.pixels.copy()
    instances = [Instance(i.ann_id, i.category, i.mask.copy()) for i in picture.instances]
    hidden = [Instance(i.ann_id, i.category, i.mask.copy()) for i in picture.hidden]
    height, width = pixels.shape[:2]
    for donor, source in zip(donors, donor_pixels):
        patch, mask = _cut(donor, source, rng, height, width)
        if patch is None:
            continue
        h, w = mask.shape
        for _ in range(20):
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            region = np.zeros((height, width), dtype=bool)
            region[y : y + h, x : x + w] = mask
            if all((inst.mask & ~region).sum() >= KEEP_VISIBLE * inst.mask.sum() for inst in instances):
                pixels[region] = patch[mask]
                for inst in instances + hidden:
                    inst.mask &= ~region
                instances.append(Instance(donor.ann_id, donor.category, region))
                break
    return Picture(
        _variant_name(picture.file_name, f"paste{k}"),
        picture.split,
        pixels,
        instances,
        picture.source,
        f"paste{k}",
        hidden,
    )


def _cut(
    donor: Instance, pixels: np.ndarray, rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray | None, np.ndarray]:
    ys, xs = np.nonzero(donor.mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch, mask = pixels[y0:y1, x0:x1], donor.mask[y0:y1, x0:x1]
    scale = float(rng.uniform(*PASTE_SCALE))
    scale = min(scale, 0.8 * height / mask.shape[0], 0.8 * width / mask.shape[1])
    size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
    patch = np.array(Image.fromarray(patch).resize(size, Image.BILINEAR))
    mask = np.array(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)).astype(bool)
    if rng.random() < 0.5:
        patch, mask = patch[:, ::-1], mask[:, ::-1]
    return (patch, mask) if mask.any() else (None, mask)


def _variant_name(file_name: str, variant: str) -> str:
    path = Path(file_name)
    return str(path.with_name(f"{path.stem}_{variant}.jpg"))


# ---------------------------------------------------------------------------------------------- the tool


def from_instances(
    instances: str | Path,
    images: str | Path,
    out: str | Path,
    splits: str | Path | None = None,
    per_object: int = 2,
    seed: int = 0,
    flip: bool = True,
    copy_paste: int = 0,
    min_area: float = 0.005,
    min_referent_area: float = 0.02,
    plural: float = 0.0,
    absent: float = 0.0,
) -> dict[str, int]:
    """Write the referring dataset (see the module docstring), with about the shares `plural` and `absent`
    of all refs naming several objects or none; returns counts of images, objects, refs and sentences."""
    if per_object < 1 or copy_paste < 0 or not 0 <= min_area < 1 or not 0 <= min_referent_area < 1:
        raise LGFormerError(
            "from-instances: --per-object >= 1, --copy-paste >= 0, 0 <= --min-area < 1, "
            "0 <= --min-referent-area < 1"
        )
    for name, share in (("plural", plural), ("absent", absent)):
        if not 0 <= share <= MAX_SHARE:
            raise LGFormerError(
                f"from-instances: --{name} {share}: a share of the refs between 0 and {MAX_SHARE}"
            )
    per_classic = np.array([plural, absent]) / (1 - plural - absent)
    owed = np.zeros(2)  # plural and absent refs due: a picture that cannot make its share passes it on
    source = InstanceSet(instances, images, splits, min_area)
    lex = lexicon(sorted(set(source.categories.values())))
    out = Path(out)
    image_dir = out / "images" / INSTANCES
    image_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(source)
    train = [k for k, split in enumerate(source.split_of) if split == TRAIN]
    for index in tqdm(range(len(source.images)), desc="from-instances", unit="image"):
        picture = source.picture(index)
        variants = [picture]
        if picture.split == TRAIN:
            if flip:
                variants.append(flipped(picture))
            for k in range(copy_paste):
                rng = np.random.default_rng([seed, index, 1000 + k])
                base = flipped(picture) if rng.random() < 0.5 else picture
                donors, donor_pixels = _donors(source, train, index, rng)
                variants.append(pasted(base, donors, donor_pixels, rng, k))
        for number, variant in enumerate(variants):
            rng = np.random.default_rng([seed, index, number])
            objs = scene_objects(variant)
            area = variant.pixels.shape[0] * variant.pixels.shape[1]
            large = [bool(inst.mask.sum() >= min_referent_area * area) for inst in variant.instances]
            refs = refer_refs(objs, lex, rng, per_object, large)
            sets = []
            if plural or absent:
                owed = np.minimum(owed + len(refs) * per_classic, MAX_OWED)
                swaps = absent_nouns(variant, source.supercategories, lex)
                extra = np.random.default_rng([seed, index, number, 1])
                sets = set_refs(objs, hidden_objects(variant), lex, extra, (owed[0], owed[1]), swaps)
                owed -= [sum(1 for m, _, _ in sets if m), sum(1 for m, _, _ in sets if not m)]
            if number == 0:
                atomic_write(
                    image_dir / picture.file_name, (source.image_dir / picture.file_name).read_bytes()
                )
            else:
                atomic_write(image_dir / variant.file_name, _jpeg(variant.pixels))
            writer.add(variant, objs, refs, sets)
    writer.finish(out / INSTANCES, seed)
    return writer.counts()


def _donors(
    source: InstanceSet, train: list[int], index: int, rng: np.random.Generator
) -> tuple[list[Instance], list[np.ndarray]]:
    """One to three instances of other training photos."""
    donors, pixels = [], []
    others = [k for k in train if k != index]
    for _ in range(int(rng.integers(1, 4)) if others else 0):
        picture = source.picture(others[int(rng.integers(len(others)))])
        if picture.instances:
            donors.append(picture.instances[int(rng.integers(len(picture.instances)))])
            pixels.append(picture.pixels)
    return donors, pixels


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buffer.getvalue()


class _Writer:
    """Numbers images, annotations, refs and sentences in order and collects the REFER records."""

    def __init__(self, source: InstanceSet) -> None:
        self.source = source
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.refs: list[dict] = []
        self.sentences = 0
        self.levels: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()

    def add(
        self,
        picture: Picture,
        objs: list[Obj],
        refs: list[tuple[int, int, list[str]]],
        sets: list[tuple[tuple[int, ...], int, list[str]]],
    ) -> None:
        height, width = picture.pixels.shape[:2]
        image_id = len(self.images) + 1
        self.images.append(
            {
                "id": image_id,
                "file_name": picture.file_name,
                "height": height,
                "width": width,
                "source_image_id": self.source.images[picture.source]["id"],
                "variant": picture.variant,
            }
        )
        category_ids = {name: cid for cid, name in self.source.categories.items()}
        ann_ids = []
        for inst, obj in zip(picture.instances, objs):
            ann_ids.append(len(self.annotations) + 1)
            ys, xs = np.nonzero(inst.mask)
            self.annotations.append(
                {
                    "id": ann_ids[-1],
                    "image_id": image_id,
                    "category_id": category_ids[inst.category],
                    "segmentation": encode_rle(inst.mask),
                    "area": int(inst.mask.sum()),
                    "bbox": [
                        int(xs.min()),
                        int(ys.min()),
                        int(xs.max() - xs.min() + 1),
                        int(ys.max() - ys.min() + 1),
                    ],
                    "iscrowd": 0,
                    "attributes": {
                        "category": obj.shape,
                        "color": obj.color,
                        "size": obj.size,
                        "center": [obj.cx, obj.cy],
                        "radius": obj.r,
                        "source_ann_id": inst.ann_id,
                    },
                }
            )
        for members, lvl, texts in [((i,), lvl, texts) for i, lvl, texts in refs] + sets:
            self.refs.append(
                refer_ref(
                    len(self.refs),
                    image_id,
                    [ann_ids[i] for i in members],
                    [category_ids[picture.instances[i].category] for i in members],
                    picture.split,
                    lvl,
                    texts,
                    picture.file_name,
                    self.sentences,
                )
            )
            self.sentences += len(texts)
            if len(members) == 1:
                self.levels[lvl] += 1
            else:
                self.kinds["plural" if members else "absent"] += 1

    def finish(self, folder: Path, seed: int) -> None:
        instances = {
            "info": {
                "description": "lgformer referring expressions from instances",
                "seed": seed,
                "source": self.source.path.name,
            },
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": cid, "name": name} for cid, name in self.source.categories.items()],
        }
        atomic_write(folder / "instances.json", json.dumps(instances, separators=(",", ":")))
        atomic_write(folder / f"refs({INSTANCES}).p", deterministic_pickle(self.refs))

    def counts(self) -> dict[str, int]:
        return {
            "images": len(self.images),
            "objects": len(self.annotations),
            "refs": len(self.refs),
            "sentences": self.sentences,
            **{f"level {k}": v for k, v in sorted(self.levels.items())},
            **dict(sorted(self.kinds.items())),
        }
