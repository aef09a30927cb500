"""Where referents come from: the REFER release (and the synthetic benchmark in its layout), gRefCOCO, the
custom JSONL format, and the public sentence CSVs (text only). Every source yields `Referent` records.

REFER layout: DATA_ROOT/<dataset>/instances.json and DATA_ROOT/<dataset>/refs(<split_by>).p, images under
DATA_ROOT/images/mscoco/images/train2014 (COCO datasets), DATA_ROOT/images/saiapr_tc-12 (refclef) or
DATA_ROOT/images/synth (synthetic benchmark); `image_dir` overrides the folder.

gRefCOCO (generalized referring expressions, ReLA's layout): DATA_ROOT/grefcoco/grefs(<split_by>).json (or
its `.p` pickle) + DATA_ROOT/grefcoco/instances.json, images under DATA_ROOT/images/train2014. A ref's
`ann_id` is a list: several objects (the ground truth is their union) or `[-1]` for none (`no_target`).

JSONL: one referent per line, paths relative to the file:
  {"image": "img.jpg", "mask": MASK | [MASK, ...] | null, "sentences": ["...", ...], "split": "train",
   "id": "...", "level": 0-4 (optional), "no_target": true (optional)}
with MASK = "m.png" | {"rle": {...}} | {"polygons": [[x, y, ...], ...]}; a list of masks is their union
(several objects), `null` or `"no_target": true` (mask null or absent) names nothing.
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

from lgformer.config import GENERATED, GREFCOCO, JSONL
from lgformer.data.masks import decode_segmentation, read_mask_png
from lgformer.data.pickles import load_plain_pickle
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write

JSONL_FIELDS = ("image", "mask", "sentences", "split", "id", "level", "no_target")


@dataclass(frozen=True)
class Sentence:
    sent_id: int | str
    text: str


@dataclass(frozen=True)
class TargetUnion:
    """Several objects named by one expression ("both teddy bears"): the ground truth is the union of their
    segmentations, each one a `Referent.segmentation` of its own."""

    parts: tuple[Any, ...]


@dataclass
class Referent:
    """What one expression names, with its sentences. `segmentation` is COCO polygons (list), an RLE (dict), a
    mask PNG (Path) or a `TargetUnion` of those; `no_target` refs name nothing (their ground truth is empty,
    `segmentation` None). `image` and `segmentation` are None for a text-only source."""

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
    no_target: bool = False

    @property
    def targets(self) -> int:
        """How many objects the expression names: 0 (no target), 1, or more."""
        if self.no_target:
            return 0
        return len(self.segmentation.parts) if isinstance(self.segmentation, TargetUnion) else 1


TARGET_KINDS = ("single", "multi", "no-target")


def target_kind(targets: int) -> str:
    """gRefCOCO's kinds of expression by how many objects they name."""
    return "no-target" if targets == 0 else "single" if targets == 1 else "multi"


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
    if dataset == GREFCOCO:
        return root / "images" / "train2014"  # ReLA's layout
    return root / "images" / "mscoco" / "images" / "train2014"


def referent_mask(ref: Referent, rule: str) -> np.ndarray:
    """The referent's ground truth at the original image size, bool (H, W): empty for a no-target ref, the
    union of the objects' masks for several."""
    if ref.size is None:
        raise LGFormerError(f"{ref.where}: a text-only source has no masks")
    if ref.no_target:
        return np.zeros(ref.size, dtype=bool)
    if isinstance(ref.segmentation, TargetUnion):
        mask = np.zeros(ref.size, dtype=bool)
        for part in ref.segmentation.parts:
            mask |= _object_mask(part, ref, rule)
        return mask
    return _object_mask(ref.segmentation, ref, rule)


def _object_mask(segmentation: Any, ref: Referent, rule: str) -> np.ndarray:
    if isinstance(segmentation, Path):
        mask = read_mask_png(segmentation, ref.where)
        if mask.shape != ref.size:
            raise LGFormerError(
                f"{ref.where}: mask {segmentation} is {mask.shape[1]}x{mask.shape[0]}, "
                f"the image is {ref.size[1]}x{ref.size[0]}"
            )
        return mask
    return decode_segmentation(segmentation, ref.size[0], ref.size[1], rule, ref.where)


# ----------------------------------------------------------------------------------------------- REFER


def load_refer(
    root: str | Path, dataset: str, split_by: str, image_dir: str | Path | None = None
) -> list[Referent]:
    """All refs of DATA_ROOT/<dataset>/refs(<split_by>).p joined with instances.json (every split)."""
    folder = Path(root) / dataset
    refs_path = folder / f"refs({split_by}).p"
    images, anns = _read_instances(folder / "instances.json", f"DATA_ROOT/{dataset}/instances.json")
    if not refs_path.is_file():
        found = sorted(p.name for p in folder.glob("refs(*).p"))
        raise LGFormerError(
            f"{refs_path}: file not found (in {folder}: {', '.join(found) or 'no refs files'})"
        )
    refs = load_plain_pickle(refs_path)
    if not isinstance(refs, list):
        raise LGFormerError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    image_root = Path(image_dir) if image_dir is not None else default_image_dir(Path(root), dataset)
    return [_ref_referent(ref, k, refs_path, images, anns, image_root) for k, ref in enumerate(refs)]


def load_grefcoco(root: str | Path, split_by: str, image_dir: str | Path | None = None) -> list[Referent]:
    """All refs of DATA_ROOT/grefcoco/grefs(<split_by>).json (or .p) joined with instances.json: each ref's
    `ann_id` list becomes one object, a `TargetUnion` of several, or no target (`[-1]`)."""
    folder = Path(root) / GREFCOCO
    images, anns = _read_instances(folder / "instances.json", f"DATA_ROOT/{GREFCOCO}/instances.json")
    json_path, pickle_path = folder / f"grefs({split_by}).json", folder / f"grefs({split_by}).p"
    if json_path.is_file():
        refs_path, refs = json_path, read_json(json_path)
    elif pickle_path.is_file():
        refs_path, refs = pickle_path, load_plain_pickle(pickle_path)
    else:
        found = sorted(p.name for p in folder.glob("grefs(*)*"))
        raise LGFormerError(
            f"{json_path}: file not found (nor {pickle_path.name}; in {folder}: {', '.join(found) or 'none'})"
        )
    if not isinstance(refs, list):
        raise LGFormerError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    image_root = Path(image_dir) if image_dir is not None else default_image_dir(Path(root), GREFCOCO)
    return [_ref_referent(ref, k, refs_path, images, anns, image_root) for k, ref in enumerate(refs)]


def _targets(ref: dict, where: str, anns: dict) -> tuple[Any, Any, bool]:
    """(object id, segmentation, no_target) of a ref: REFER's one `ann_id`, or gRefCOCO's list of them
    (several objects: a `TargetUnion`; `[-1]`: no target)."""
    ann_ids = ref["ann_id"]
    if _is_id(ann_ids) and ann_ids != -1:
        if ann_ids not in anns:
            raise LGFormerError(f"{where}: annotation {ann_ids} is not in instances.json")
        return ann_ids, anns[ann_ids]["segmentation"], False
    if not isinstance(ann_ids, list) or not ann_ids or not all(_is_id(a) for a in ann_ids):
        raise LGFormerError(f"{where}: field 'ann_id': expected an annotation id or a non-empty list of them")
    no_target = ann_ids == [-1]
    if -1 in ann_ids and not no_target:
        raise LGFormerError(f"{where}: field 'ann_id': -1 (no target) stands alone, got {ann_ids}")
    if ref.get("no_target", no_target) is not no_target:
        raise LGFormerError(f"{where}: field 'no_target': {ref['no_target']!r} but 'ann_id' is {ann_ids}")
    if no_target:
        return None, None, True
    for ann_id in ann_ids:
        if ann_id not in anns:
            raise LGFormerError(f"{where}: field 'ann_id': annotation {ann_id} is not in instances.json")
    if len(ann_ids) == 1:
        return ann_ids[0], anns[ann_ids[0]]["segmentation"], False
    return tuple(ann_ids), TargetUnion(tuple(anns[a]["segmentation"] for a in ann_ids)), False


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_instances(path: Path, layout: str) -> tuple[dict, dict]:
    """A COCO instances.json -> ({image id: image}, {annotation id: annotation}), fields checked."""
    if not path.is_file():
        raise LGFormerError(f"{path}: file not found (REFER layout: {layout})")
    instances = read_json(path)
    images = {
        img["id"]: img for img in _records(instances, "images", ("id", "file_name", "height", "width"), path)
    }
    anns = {
        ann["id"]: ann for ann in _records(instances, "annotations", ("id", "image_id", "segmentation"), path)
    }
    return images, anns


def _check_ref(ref: Any, k: int, path: Path) -> str:
    """The fields every REFER-style ref needs; returns the `where` its errors name."""
    if not isinstance(ref, dict):
        raise LGFormerError(f"{path} ref #{k}: expected a dict, got {type(ref).__name__}")
    where = f"{path} ref_id {ref['ref_id']}" if "ref_id" in ref else f"{path} ref #{k}"
    missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "sentences") if key not in ref]
    if missing:
        raise LGFormerError(f"{where}: missing field(s) {', '.join(missing)}")
    return where


def _ref_referent(ref: Any, k: int, path: Path, images: dict, anns: dict, image_root: Path) -> Referent:
    """Ref #k of a REFER or gRefCOCO refs file as a `Referent`, every field checked."""
    where = _check_ref(ref, k, path)
    object_id, segmentation, no_target = _targets(ref, where, anns)
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
        object_id=object_id,
        size=(int(img["height"]), int(img["width"])),
        segmentation=segmentation,
        level=int(ref.get("level", 0)),
        no_target=no_target,
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
    no_target = record.get("no_target", False)
    if not isinstance(no_target, bool):
        raise LGFormerError(f"{where}: field 'no_target': expected true or false")
    for key in ("image", "sentences", "split", "id", *(() if no_target else ("mask",))):
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
    mask = record.get("mask")
    if mask is None and "no_target" in record and not no_target:
        raise LGFormerError(f"{where}: field 'mask': null (no target) but 'no_target' is false")
    if mask is not None and no_target:
        raise LGFormerError(f"{where}: field 'mask': a no-target line has \"mask\": null or no mask")
    segmentation: Any = None
    if isinstance(mask, list):
        if not mask:
            raise LGFormerError(f"{where}: field 'mask': an empty list (for no target write null)")
        parts = tuple(_jsonl_mask(part, where, base, height, width) for part in mask)
        segmentation = parts[0] if len(parts) == 1 else TargetUnion(parts)
    elif mask is not None:
        segmentation = _jsonl_mask(mask, where, base, height, width)
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
        no_target=segmentation is None,
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
    raise LGFormerError(
        f'{field_where}: expected a PNG path, {{"rle": {{...}}}}, {{"polygons": [[...]]}}, a list of '
        "those (several objects) or null (no target)"
    )


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
        if ref.no_target:
            mask: Any = None
        elif isinstance(seg, TargetUnion):
            mask = [_jsonl_mask_value(part, base) for part in seg.parts]
        else:
            mask = _jsonl_mask_value(seg, base)
        record: dict[str, Any] = {
            "image": os.path.relpath(ref.image.resolve(), base),
            "mask": mask,
            "sentences": [s.text for s in ref.sentences],
            "split": ref.split,
            "id": str(ref.ref_id),
        }
        if ref.level:
            record["level"] = ref.level
        if ref.no_target:
            record["no_target"] = True
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write(out, "".join(line + "\n" for line in lines))
    return len(lines)


def _jsonl_mask_value(seg: Any, base: Path) -> Any:
    """One object's segmentation as a JSONL MASK: a PNG path relative to `base`, an RLE or polygons."""
    if isinstance(seg, Path):
        return os.path.relpath(seg.resolve(), base)
    if isinstance(seg, dict):
        counts = seg["counts"]
        return {
            "rle": {
                "size": seg["size"],
                "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
            }
        }
    return {"polygons": seg}


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
