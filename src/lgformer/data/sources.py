"""Where referents come from: the REFER release (and the synthetic benchmark in its layout), the custom JSONL
format, and the public sentence CSVs (text only). Every source yields the same `Referent` records.

REFER layout: DATA_ROOT/<dataset>/instances.json and DATA_ROOT/<dataset>/refs(<split_by>).p, images under
DATA_ROOT/images/mscoco/images/train2014 (COCO datasets), DATA_ROOT/images/saiapr_tc-12 (refclef) or
DATA_ROOT/images/synth (synthetic benchmark); `image_dir` overrides the folder.

JSONL: one referent per line, paths relative to the file:
  {"image": "img.jpg", "mask": "m.png" | {"rle": {...}} | {"polygons": [[x, y, ...], ...]},
   "sentences": ["...", ...], "split": "train", "id": "...", "level": 0-4 (optional)}
Every line is validated on load (fields, files, mask size = image size); errors name the line and field.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lgformer.config import GENERATED, JSONL
from lgformer.data.masks import decode_segmentation, read_mask_png
from lgformer.data.pickles import load_plain_pickle
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write

JSONL_FIELDS = ("image", "mask", "sentences", "split", "id", "level")


@dataclass(frozen=True)
class Sentence:
    sent_id: int | str
    text: str


@dataclass
class Referent:
    """One referred object with its sentences. `segmentation` is COCO polygons (list), an RLE (dict) or a mask
    PNG (Path); `image` and `segmentation` are None for a text-only source."""

    ref_id: int | str
    split: str
    sentences: list[Sentence]
    where: str  # "file" or "file:line", for error messages
    image: Path | None = None
    image_id: int | str | None = None
    object_id: int | str | None = None
    size: tuple[int, int] | None = None  # (height, width) as the source declares it
    segmentation: Any = None
    level: int = 0


def dataset_of(root: str | None, dataset: str | None, default: str | None = None) -> str | None:
    """`--dataset` as given, else `jsonl` for a `.jsonl` root, else `default`."""
    if dataset is not None:
        return dataset
    return JSONL if root is not None and str(root).endswith(".jsonl") else default


def default_image_dir(root: Path, dataset: str) -> Path:
    if dataset == "refclef":
        return root / "images" / "saiapr_tc-12"
    if dataset in GENERATED:
        return root / "images" / dataset
    return root / "images" / "mscoco" / "images" / "train2014"


def referent_mask(ref: Referent, rule: str) -> np.ndarray:
    """The referent's ground truth at the original image size, bool (H, W)."""
    if ref.size is None:
        raise LGFormerError(f"{ref.where}: a text-only source has no masks")
    if isinstance(ref.segmentation, Path):
        mask = read_mask_png(ref.segmentation, ref.where)
        if mask.shape != ref.size:
            raise LGFormerError(
                f"{ref.where}: mask {ref.segmentation} is {mask.shape[1]}x{mask.shape[0]}, "
                f"the image is {ref.size[1]}x{ref.size[0]}"
            )
        return mask
    return decode_segmentation(ref.segmentation, ref.size[0], ref.size[1], rule, ref.where)


# ----------------------------------------------------------------------------------------------- REFER


def load_refer(
    root: str | Path, dataset: str, split_by: str, image_dir: str | Path | None = None
) -> list[Referent]:
    """All refs of DATA_ROOT/<dataset>/refs(<split_by>).p joined with instances.json (every split)."""
    folder = Path(root) / dataset
    instances_path = folder / "instances.json"
    refs_path = folder / f"refs({split_by}).p"
    if not instances_path.is_file():
        raise LGFormerError(
            f"{instances_path}: file not found (REFER layout: DATA_ROOT/{dataset}/instances.json)"
        )
    if not refs_path.is_file():
        found = sorted(p.name for p in folder.glob("refs(*).p"))
        raise LGFormerError(
            f"{refs_path}: file not found (in {folder}: {', '.join(found) or 'no refs files'})"
        )
    instances = read_json(instances_path)
    images = {
        img["id"]: img
        for img in _records(instances, "images", ("id", "file_name", "height", "width"), instances_path)
    }
    anns = {
        ann["id"]: ann
        for ann in _records(instances, "annotations", ("id", "image_id", "segmentation"), instances_path)
    }
    refs = load_plain_pickle(refs_path)
    if not isinstance(refs, list):
        raise LGFormerError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    image_root = Path(image_dir) if image_dir is not None else default_image_dir(Path(root), dataset)
    return [_refer_referent(ref, k, refs_path, images, anns, image_root) for k, ref in enumerate(refs)]


def _refer_referent(ref: Any, k: int, path: Path, images: dict, anns: dict, image_root: Path) -> Referent:
    where = f"{path} ref #{k}"
    if not isinstance(ref, dict):
        raise LGFormerError(f"{where}: expected a dict, got {type(ref).__name__}")
    missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "sentences") if key not in ref]
    if missing:
        raise LGFormerError(f"{where}: missing field(s) {', '.join(missing)}")
    where = f"{path} ref_id {ref['ref_id']}"
    ann = anns.get(ref["ann_id"])
    if ann is None:
        raise LGFormerError(f"{where}: annotation {ref['ann_id']} is not in instances.json")
    img = images.get(ref["image_id"])
    if img is None:
        raise LGFormerError(f"{where}: image {ref['image_id']} is not in instances.json")
    if not isinstance(ref["sentences"], list):
        raise LGFormerError(f"{where}: 'sentences' must be a list")
    sentences = []
    for j, sent in enumerate(ref["sentences"]):
        text = sent.get("raw", sent.get("sent")) if isinstance(sent, dict) else None
        if not isinstance(text, str):
            raise LGFormerError(f"{where}: sentence {j} has no 'raw' text")
        if not text.strip():
            raise LGFormerError(f"{where}: sentence {sent.get('sent_id', j)} is empty")
        sentences.append(Sentence(sent.get("sent_id", j), text))
    if not sentences:
        raise LGFormerError(f"{where}: no sentences")
    return Referent(
        ref_id=ref["ref_id"],
        split=str(ref["split"]),
        sentences=sentences,
        where=where,
        image=image_root / img["file_name"],
        image_id=ref["image_id"],
        object_id=ref["ann_id"],
        size=(int(img["height"]), int(img["width"])),
        segmentation=ann["segmentation"],
        level=int(ref.get("level", 0)),
    )


def read_json(path: Path) -> Any:
    """A JSON file, every failure one line naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise LGFormerError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise LGFormerError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError:
        raise LGFormerError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise LGFormerError(f"{path}: refused: JSON nested too deeply") from None


def _records(instances: Any, key: str, fields: Sequence[str], path: Path) -> list[dict]:
    records = instances.get(key) if isinstance(instances, dict) else None
    if not isinstance(records, list):
        raise LGFormerError(f"{path}: expected a COCO object with a list {key!r}")
    for k, record in enumerate(records):
        if not isinstance(record, dict) or any(f not in record for f in fields):
            raise LGFormerError(f"{path}: {key}[{k}] needs the fields {', '.join(fields)}")
    return records


# ----------------------------------------------------------------------------------------------- JSONL


def load_jsonl(path: str | Path, image_dir: str | Path | None = None) -> list[Referent]:
    """Every referent of a JSONL file, validated (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LGFormerError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise LGFormerError(f"{path}: not UTF-8 text") from None
    image_root = Path(image_dir) if image_dir is not None else path.parent
    referents: list[Referent] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ref = _jsonl_referent(line, f"{path}:{number}", path.parent, image_root)
        if ref.ref_id in seen:
            raise LGFormerError(
                f"{path}:{number}: field 'id': {ref.ref_id!r} already used on line {seen[ref.ref_id]}"
            )
        seen[str(ref.ref_id)] = number
        referents.append(ref)
    if not referents:
        raise LGFormerError(f"{path}: no referents (expected one JSON object per line)")
    return referents


def _jsonl_referent(line: str, where: str, base: Path, image_root: Path) -> Referent:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LGFormerError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise LGFormerError(f"{where}: refused: JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise LGFormerError(f"{where}: expected a JSON object")
    unknown = sorted(set(record) - set(JSONL_FIELDS))
    if unknown:
        raise LGFormerError(f"{where}: unknown field {unknown[0]!r}; valid fields: {', '.join(JSONL_FIELDS)}")
    for key in ("image", "mask", "sentences", "split", "id"):
        if key not in record:
            raise LGFormerError(f"{where}: missing field {key!r}")
    ref_id = record["id"]
    if isinstance(ref_id, bool) or not isinstance(ref_id, (str, int)) or str(ref_id) == "":
        raise LGFormerError(f"{where}: field 'id': expected a non-empty string")
    ref_id = str(ref_id)
    split = record["split"]
    if not isinstance(split, str) or not split:
        raise LGFormerError(f"{where}: field 'split': expected a non-empty string such as \"train\"")
    texts = record["sentences"]
    if not isinstance(texts, list) or not texts:
        raise LGFormerError(f"{where}: field 'sentences': expected a non-empty list of strings")
    for k, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise LGFormerError(f"{where}: field 'sentences': sentence {k} is empty or not a string")
    level = record.get("level", 0)
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 4:
        raise LGFormerError(f"{where}: field 'level': expected an integer 0-4")
    if not isinstance(record["image"], str) or not record["image"]:
        raise LGFormerError(f"{where}: field 'image': expected a path string")
    image = image_root / record["image"]
    height, width = _image_size(image, f"{where}: field 'image'")
    segmentation = _jsonl_mask(record["mask"], where, base, height, width)
    return Referent(
        ref_id=ref_id,
        split=split,
        sentences=[Sentence(f"{ref_id}:{k}", text) for k, text in enumerate(texts)],
        where=where,
        image=image,
        image_id=record["image"],
        object_id=ref_id,
        size=(height, width),
        segmentation=segmentation,
        level=level,
    )


def _image_size(image: Path, where: str) -> tuple[int, int]:
    """(height, width) of a picture file, read from its header; one-line errors name `where`."""
    try:
        with Image.open(image) as im:
            width, height = im.size
    except FileNotFoundError:
        raise LGFormerError(f"{where}: file not found: {image}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise LGFormerError(f"{where}: cannot read {image} ({exc})") from None
    return height, width


def _jsonl_mask(mask: Any, where: str, base: Path, height: int, width: int) -> Any:
    field_where = f"{where}: field 'mask'"
    if isinstance(mask, str) and mask:
        path = base / mask
        mask_height, mask_width = _image_size(path, field_where)
        if (mask_height, mask_width) != (height, width):
            raise LGFormerError(
                f"{field_where}: {path} is {mask_width}x{mask_height}, the image is {width}x{height}"
            )
        return path
    if isinstance(mask, dict) and len(mask) == 1 and "rle" in mask and isinstance(mask["rle"], dict):
        rle = mask["rle"]
        if rle.get("size") != [height, width]:
            raise LGFormerError(
                f"{field_where}: RLE size {rle.get('size')} differs from the image size [{height}, {width}]"
            )
        return rle
    if isinstance(mask, dict) and len(mask) == 1 and isinstance(mask.get("polygons"), list):
        polygons = mask["polygons"]
        for poly in polygons:
            if (
                not isinstance(poly, list)
                or len(poly) % 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly)
            ):
                raise LGFormerError(f"{field_where}: polygons must be flat lists of x, y numbers")
        return polygons
    raise LGFormerError(f'{field_where}: expected a PNG path, {{"rle": {{...}}}} or {{"polygons": [[...]]}}')


def export_jsonl(referents: Sequence[Referent], out: str | Path) -> int:
    """Write `referents` in the JSONL format (paths relative to `out`, masks as the source stores them, so
    the GT rule is applied on load). Returns the number of lines."""
    out = Path(out)
    base = out.resolve().parent
    lines = []
    for ref in referents:
        if ref.image is None:
            raise LGFormerError(f"{ref.where}: a text-only source cannot be exported")
        seg = ref.segmentation
        if isinstance(seg, Path):
            mask: Any = os.path.relpath(seg.resolve(), base)
        elif isinstance(seg, dict):
            counts = seg["counts"]
            mask = {
                "rle": {
                    "size": seg["size"],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                }
            }
        else:
            mask = {"polygons": seg}
        record: dict[str, Any] = {
            "image": os.path.relpath(ref.image.resolve(), base),
            "mask": mask,
            "sentences": [s.text for s in ref.sentences],
            "split": ref.split,
            "id": str(ref.ref_id),
        }
        if ref.level:
            record["level"] = ref.level
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write(out, "".join(line + "\n" for line in lines))
    return len(lines)


# ----------------------------------------------------------------------------------------- sentence CSV


def load_sentence_csv(path: str | Path) -> list[Referent]:
    """A public sentence table (uid,ref_id,img_id,sent_id,sent,bbox): text-only referents. The split is the
    last part of the file name (refcoco+_unc_val.csv -> val)."""
    path = Path(path)
    split = path.stem.rsplit("_", 1)[-1]
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [
                c for c in ("ref_id", "img_id", "sent_id", "sent") if c not in (reader.fieldnames or [])
            ]
            if missing:
                raise LGFormerError(
                    f"{path}: missing column(s) {', '.join(missing)} (expected ref_id,img_id,sent_id,sent)"
                )
            by_ref: dict[str, Referent] = {}
            for number, row in enumerate(reader, start=2):
                text = row["sent"] or ""
                if not text.strip():
                    raise LGFormerError(f"{path}:{number}: field 'sent': empty sentence")
                ref = by_ref.get(row["ref_id"])
                if ref is None:
                    ref = by_ref[row["ref_id"]] = Referent(
                        ref_id=_int_or_str(row["ref_id"]),
                        split=split,
                        sentences=[],
                        where=str(path),
                        image_id=_int_or_str(row["img_id"]),
                    )
                ref.sentences.append(Sentence(_int_or_str(row["sent_id"]), text))
    except FileNotFoundError:
        raise LGFormerError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise LGFormerError(f"{path}: not UTF-8 text") from None
    if not by_ref:
        raise LGFormerError(f"{path}: no sentences")
    return list(by_ref.values())


def _int_or_str(value: str) -> int | str:
    return int(value) if value.lstrip("-").isdigit() else value
