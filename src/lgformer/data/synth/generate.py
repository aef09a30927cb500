"""`lgformer data synth`: write the synthetic referring benchmark in the REFER layout.

    OUT/images/synth/synth_<split>_<index>.jpg
    OUT/synth/instances.json     images, annotations (exact RLE of the visible pixels + the scene graph under
                                 "attributes"), categories (the shapes)
    OUT/synth/refs(synth).p      REFER refs (protocol 2) with sentences and the level of each ref

Scene i of a split is made for level 1 + i % 4 and yields `refs_per_scene` refs of that level, so the four
levels are balanced. A ref's level is the lowest level at which its object can be described at all (a
level-3 ref has an identical twin, so attributes do not identify it; a level-4 ref cannot be identified by
any single relation either), and its sentences are verified expressions of that level. Everything about a
scene derives from (seed, split, index), so the output is byte-identical for a seed whatever the number of
worker processes.

The generalized benchmark (`plural`, `absent` > 0) adds, per scene and from a random stream of its own (the
scene and its classic refs stay exactly what they were), a plural ref naming two or more objects ("both
triangles": `ann_id` the list of their annotations) and an absent one naming nothing ("the green star" in a
scene with no green star but another star: `ann_id` [-1], `no_target` true), in gRefCOCO's convention, each
verified by the interpreter. With both shares 0 (the default of `generate`) the bytes are the classic
benchmark's; the generalized one records its shares in instances.json's "info".
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lgformer.data.masks import encode_rle
from lgformer.data.synth.describe import describe, describe_absent, describe_plural
from lgformer.data.synth.grammar import SHAPES, Obj, level, min_level, parse
from lgformer.data.synth.scene import encode_jpeg, render_image, sample_objects
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write

SPLITS = ("train", "val", "test")
REFS_PER_SCENE = 3
SENTENCES_PER_REF = 3
MAX_ATTEMPTS = 500
VERSION = 1


@dataclass
class Scene:
    split: str
    index: int
    level: int
    objs: list[Obj]
    masks: list[dict]  # RLE of each object's visible pixels
    areas: list[int]
    boxes: list[list[int]]
    visible_share: list[float]
    jpeg: bytes
    refs: list[tuple[int, list[str]]]  # (object index, sentences)
    sets: list[tuple[tuple[int, ...], list[str]]] = field(
        default_factory=list
    )  # plural (objects) / absent (())

    @property
    def file_name(self) -> str:
        return f"synth_{self.split}_{self.index:06d}.jpg"


def make_scene(
    seed: int, split: str, index: int, size: int, n_refs: int, plural: float = 0.0, absent: float = 0.0
) -> Scene:
    """Scene `index` of `split`: objects, picture, masks and `n_refs` refs of level 1 + index % 4; with
    probability `plural` a plural ref and with `absent` an absent one besides (see the module docstring)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    plan = 1 + index % 4
    for _ in range(MAX_ATTEMPTS):
        sampled = sample_objects(rng, plan, size)
        if sampled is None:
            continue
        objs, full, visible = sampled
        eligible = [i for i in range(len(objs)) if min_level(i, objs) == plan]
        if len(eligible) < n_refs:
            continue
        refs = []
        for i in rng.permutation(eligible).tolist():
            texts = describe(i, objs, plan, rng, SENTENCES_PER_REF)
            if len(texts) >= 2:
                refs.append((i, texts))
                if len(refs) == n_refs:
                    break
        if len(refs) < n_refs:
            continue
        refs.sort()
        image = render_image(rng, objs, full, size)
        sets: list[tuple[tuple[int, ...], list[str]]] = []
        if plural or absent:
            extra = np.random.default_rng([seed, SPLITS.index(split), index, 1])
            if extra.random() < plural and (found := describe_plural(objs, extra, SENTENCES_PER_REF)):
                sets.append(found)
            if extra.random() < absent and (texts := describe_absent(objs, extra, SENTENCES_PER_REF)):
                sets.append(((), texts))
        return Scene(
            split=split,
            index=index,
            level=plan,
            objs=objs,
            masks=[encode_rle(v) for v in visible],
            areas=[int(np.count_nonzero(v)) for v in visible],
            boxes=[_box(v) for v in visible],
            visible_share=[
                round(np.count_nonzero(v) / np.count_nonzero(f), 3) for v, f in zip(visible, full)
            ],
            jpeg=encode_jpeg(image),
            refs=refs,
            sets=sets,
        )
    raise LGFormerError(
        f"synth: no level-{plan} scene with {n_refs} refs found for {split} {index} in {MAX_ATTEMPTS} "
        f"attempts (image size {size} too small?)"
    )


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _scene_task(task: tuple) -> Scene:
    return make_scene(*task)


def scene_tasks(
    seed: int,
    counts: dict[str, int],
    size: int,
    n_refs: int = REFS_PER_SCENE,
    plural: float = 0.0,
    absent: float = 0.0,
) -> list[tuple]:
    """(seed, split, index, size, refs[, plural, absent]) for every scene; the last scene of a split takes
    the remainder. `plural` and `absent` are shares of all refs, made per-scene probabilities here."""
    extra = ()
    if plural or absent:
        classic = 1.0 - plural - absent
        extra = (n_refs * plural / classic, n_refs * absent / classic)
    tasks = []
    for split in SPLITS:
        total = counts.get(split, 0)
        for index in range(math.ceil(total / n_refs)):
            tasks.append((seed, split, index, size, min(n_refs, total - index * n_refs), *extra))
    return tasks


def generate(
    out: str | Path,
    counts: dict[str, int],
    seed: int = 0,
    size: int = 320,
    workers: int = 1,
    plural: float = 0.0,
    absent: float = 0.0,
) -> dict[str, int]:
    """Write the benchmark with counts[split] classic refs per split, and about the shares `plural` and
    `absent` of all refs besides; returns the numbers of images, objects and refs."""
    if size < 96:
        raise LGFormerError(f"synth: image size {size} is too small (at least 96)")
    if size > 2048:
        raise LGFormerError(f"synth: image size {size} is too large (at most 2048)")
    for name, share in (("plural", plural), ("absent", absent)):
        if not 0 <= share <= 1 / (REFS_PER_SCENE + 2):
            raise LGFormerError(
                f"synth: --{name} {share}: a share of the refs between 0 and {1 / (REFS_PER_SCENE + 2):.2f} "
                f"(at most one {name} ref per scene of {REFS_PER_SCENE})"
            )
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise LGFormerError("synth: give a positive number of refs for at least one split")
    out = Path(out)
    image_dir = out / "images" / "synth"
    image_dir.mkdir(parents=True, exist_ok=True)
    tasks = scene_tasks(seed, counts, size, plural=plural, absent=absent)
    writer = _Writer(seed, size, counts, plural, absent)
    if workers > 1:
        with multiprocessing.get_context().Pool(workers) as pool:
            scenes = pool.imap(_scene_task, tasks, chunksize=4)
            for scene in tqdm(scenes, total=len(tasks), desc="synth scenes", unit="scene"):
                writer.add(scene, image_dir)
    else:
        for task in tqdm(tasks, desc="synth scenes", unit="scene"):
            writer.add(_scene_task(task), image_dir)
    writer.finish(out / "synth")
    keep = {image["file_name"] for image in writer.images}
    for stale in image_dir.glob("synth_*.jpg"):  # left by an earlier, larger run into the same folder
        if stale.name not in keep:
            stale.unlink()
    return {"images": len(writer.images), "objects": len(writer.annotations), "refs": len(writer.refs)}


class _Writer:
    """Numbers images, annotations, refs and sentences in scene order and collects the REFER records."""

    def __init__(
        self, seed: int, size: int, counts: dict[str, int], plural: float = 0.0, absent: float = 0.0
    ) -> None:
        self.info = {
            "description": "lgformer synthetic referring benchmark",
            "version": VERSION,
            "seed": seed,
            "image_size": size,
            "refs": {split: counts.get(split, 0) for split in SPLITS},
        }
        if plural or absent:  # the generalized benchmark (the classic one's bytes stay as they were)
            self.info["generalized"] = {"plural": plural, "absent": absent}
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.refs: list[dict] = []
        self.sentences = 0

    def add(self, scene: Scene, image_dir: Path) -> None:
        atomic_write(image_dir / scene.file_name, scene.jpeg)
        image_id = len(self.images) + 1
        size = scene.masks[0]["size"]
        self.images.append(
            {"id": image_id, "file_name": scene.file_name, "height": size[0], "width": size[1]}
        )
        ann_ids = []
        for depth, obj in enumerate(scene.objs):
            ann_ids.append(len(self.annotations) + 1)
            self.annotations.append(
                {
                    "id": ann_ids[-1],
                    "image_id": image_id,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "segmentation": scene.masks[depth],
                    "area": scene.areas[depth],
                    "bbox": scene.boxes[depth],
                    "iscrowd": 0,
                    "attributes": {
                        "shape": obj.shape,
                        "color": obj.color,
                        "size": obj.size,
                        "pattern": obj.pattern,
                        "center": [obj.cx, obj.cy],
                        "radius": obj.r,
                        "depth": depth,
                        "visible": scene.visible_share[depth],
                    },
                }
            )
        classic = [((i,), scene.level, texts) for i, texts in scene.refs]
        for members, lvl, texts in classic + [(m, level(parse(t[0])), t) for m, t in scene.sets]:
            ann = [ann_ids[i] for i in members]
            self.refs.append(
                refer_ref(
                    len(self.refs),
                    image_id,
                    ann,
                    [SHAPES.index(scene.objs[i].shape) + 1 for i in members],
                    scene.split,
                    lvl,
                    texts,
                    f"{Path(scene.file_name).stem}_{'_'.join(map(str, ann or [-1]))}.jpg",
                    self.sentences,
                )
            )
            self.sentences += len(texts)

    def finish(self, folder: Path) -> None:
        instances = {
            "info": self.info,
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"supercategory": "shape", "id": k + 1, "name": s} for k, s in enumerate(SHAPES)],
        }
        atomic_write(folder / "instances.json", json.dumps(instances, separators=(",", ":")))
        atomic_write(folder / "refs(synth).p", deterministic_pickle(self.refs))


def refer_ref(
    ref_id: int,
    image_id: int,
    ann_ids: list[int],
    category_ids: list[int],
    split: str,
    level: int,
    texts: list[str],
    file_name: str,
    first_sent_id: int,
) -> dict:
    """One REFER ref record (the fields, in the order, of the REFER release), its sentences numbered from
    `first_sent_id`: one object's `ann_id` and `category_id` as numbers; gRefCOCO's lists where it names
    several objects, `[-1]` and `no_target` where it names none."""
    sent_ids = list(range(first_sent_id, first_sent_id + len(texts)))
    record = {
        "sent_ids": sent_ids,
        "file_name": file_name,
        "ann_id": ann_ids[0] if len(ann_ids) == 1 else ann_ids or [-1],
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "sentences": [
            {"tokens": t.split(), "raw": t, "sent_id": s, "sent": t} for t, s in zip(texts, sent_ids)
        ],
        "category_id": category_ids[0] if len(category_ids) == 1 else category_ids or [-1],
        "level": level,
    }
    if len(ann_ids) != 1:
        record["no_target"] = not ann_ids
    return record


def deterministic_pickle(value: object) -> bytes:
    """Protocol 2 (as the REFER files) without the memo, so the bytes depend on the values only, not on which
    equal strings happen to be the same object."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True
    pickler.dump(value)
    return buffer.getvalue()
