"""`lgformer data from-instances`: referring expressions made from real instance masks (coco-subset)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED

from lgformer.cli import main
from lgformer.data import DataConfig, build_dataset
from lgformer.data.instances.generate import (
    Instance,
    Picture,
    flipped,
    from_instances,
    refer_refs,
    scene_objects,
)
from lgformer.data.instances.lexicon import MIDDLE, color_name, lexicon, size_names
from lgformer.data.pickles import load_plain_pickle
from lgformer.data.synth.grammar import UNKNOWN, Obj, level, parse, resolve
from lgformer.errors import LGFormerError

COCO = SHARED / "data" / "coco-subset"
SPLITS = json.loads((COCO / "splits.json").read_text())


def subset(folder: Path, train: int = 5, val: int = 2) -> Path:
    """instances.json of the first `train` train and `val` val photos of coco-subset."""
    data = json.loads((COCO / "instances.json").read_text())
    keep = [im for im in data["images"] if SPLITS[im["file_name"]] == "train"][:train]
    keep += [im for im in data["images"] if SPLITS[im["file_name"]] == "val"][:val]
    ids = {im["id"] for im in keep}
    data["images"] = keep
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = folder / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("instances")
    out = folder / "a"
    from_instances(subset(folder), COCO / "images", out, COCO / "splits.json", copy_paste=1, seed=3)
    return out


def scene_graphs(root: Path) -> dict[int, tuple[list[int], list[Obj]]]:
    """image id -> (annotation ids, objects), rebuilt from the written instances.json alone."""
    instances = json.loads((root / "instances" / "instances.json").read_text())
    scenes: dict[int, tuple[list[int], list[Obj]]] = {}
    for ann in instances["annotations"]:
        a = ann["attributes"]
        ids, objs = scenes.setdefault(ann["image_id"], ([], []))
        ids.append(ann["id"])
        objs.append(Obj(a["category"], a["color"], a["size"], UNKNOWN, *a["center"], a["radius"]))
    return scenes


def test_every_expression_names_exactly_its_referent(made: Path) -> None:
    lex = lexicon(
        sorted({c["name"] for c in json.loads((COCO / "instances.json").read_text())["categories"]})
    )
    refs = load_plain_pickle(made / "instances" / "refs(instances).p")
    scenes = scene_graphs(made)
    assert len(refs) > 40
    levels = set()
    for ref in refs:
        ids, objs = scenes[ref["image_id"]]
        for sentence in ref["sentences"]:
            desc = parse(sentence["raw"], lex)
            assert resolve(desc, objs) == ids.index(ref["ann_id"]), sentence["raw"]
            assert level(desc, lex) == ref["level"]
        levels.add(ref["level"])
    assert levels == {1, 2, 3, 4}
    splits = {ref["split"] for ref in refs}
    assert splits == {"train", "val"}


def test_variants_only_for_train_photos_and_files_load(made: Path) -> None:
    instances = json.loads((made / "instances" / "instances.json").read_text())
    variants = {
        (im["variant"], SPLITS[Path(im["file_name"]).stem.split("_")[0] + ".jpg"])
        for im in instances["images"]
    }
    assert variants == {("", "train"), ("flip", "train"), ("paste0", "train"), ("", "val")}
    for split in ("train", "val"):
        data = build_dataset(
            DataConfig(root=str(made), dataset="instances", image_size=64), split, train=False
        )
        item = data[0]
        assert item["image"].shape == (3, 64, 64) and item["mask"].sum() > 0 and item["level"] in (1, 2, 3, 4)


def test_same_seed_gives_the_same_bytes(made: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    from_instances(subset(tmp_path), COCO / "images", out, COCO / "splits.json", copy_paste=1, seed=3)
    for name in ("instances/instances.json", "instances/refs(instances).p"):
        assert (made / name).read_bytes() == (out / name).read_bytes()
    for path in (made / "images" / "instances").iterdir():
        assert path.read_bytes() == (out / "images" / "instances" / path.name).read_bytes()


def blob(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_colour_size_and_position_on_hand_made_masks() -> None:
    assert color_name(np.tile([[200, 30, 35]], (500, 1)).astype(np.uint8)) == "red"
    assert color_name(np.tile([[250, 250, 250]], (500, 1)).astype(np.uint8)) == "white"
    half = np.concatenate([np.tile([[200, 30, 35]], (250, 1)), np.tile([[40, 80, 200]], (250, 1))])
    assert color_name(half.astype(np.uint8)) == UNKNOWN  # no colour dominates
    assert size_names(["dog", "dog"], [100, 300]) == ["small", "large"]
    assert size_names(["dog", "dog"], [100, 150]) == [UNKNOWN, UNKNOWN]
    assert size_names(["dog", "dog", "dog", "cat"], [100, 400, 1600, 5]) == [
        "small",
        MIDDLE,
        "large",
        UNKNOWN,
    ]

    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :100] = (200, 30, 35)
    pixels[:, 100:] = (40, 80, 200)
    picture = Picture(
        "x.jpg",
        "train",
        pixels,
        [
            Instance(1, "dog", blob(100, 200, (10, 30, 50, 70))),  # red, left, small
            Instance(2, "dog", blob(100, 200, (120, 10, 190, 90))),  # blue, right, large
        ],
        0,
    )
    objs = scene_objects(picture)
    assert [(o.color, o.size) for o in objs] == [("red", "small"), ("blue", "large")]
    lex = lexicon(["dog"])
    for text, target in [
        ("the left dog", 0),
        ("the dog on the right", 1),
        ("the red dog", 0),
        ("the big dog", 1),
    ]:
        assert resolve(parse(text, lex), objs) == target, text
    # a flip mirrors pixels and masks: the left dog is now the blue one, and the words follow
    mirrored = scene_objects(flipped(picture))
    assert [o.color for o in mirrored] == ["red", "blue"]
    assert resolve(parse("the left dog", lex), mirrored) == 1
    assert resolve(parse("the red dog on the right", lex), mirrored) == 0
    # made after the flip, every expression is true of the mirrored scene
    for i, _, texts in refer_refs(mirrored, lex, np.random.default_rng(0), 3):
        assert all(resolve(parse(t, lex), mirrored) == i for t in texts)


def test_a_noun_that_is_also_a_colour_parses_both_ways() -> None:
    lex = lexicon(["orange", "bowl"])
    assert parse("the orange", lex).shape == "orange"
    desc = parse("the orange bowl", lex)
    assert (desc.shape, desc.attrs) == ("bowl", (("color", "orange"),))
    desc = parse("the orange orange on the left", lex)
    assert (desc.shape, desc.attrs, desc.ordinal) == ("orange", (("color", "orange"),), (1, "left"))


def broken(tmp_path: Path, edit) -> Path:
    data = json.loads(subset(tmp_path, train=2, val=0).read_text())
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["annotations"][0].pop("segmentation"), ["annotation", "missing field 'segmentation'"]),
        (lambda d: d["annotations"][0].update(category_id=999), ["annotation", "unknown category_id 999"]),
        (
            lambda d: d["annotations"][0]["segmentation"][0].extend([5000.0, 10.0]),
            ["annotation", "outside the", "image"],
        ),
        (
            lambda d: d["images"][0].update(file_name="nowhere.jpg"),
            ["nowhere.jpg", "image file not found", "annotation"],
        ),
    ],
    ids=["missing-field", "unknown-category", "polygon-outside", "image-missing"],
)
def test_bad_instances_give_one_line_errors(tmp_path: Path, edit, words: list[str]) -> None:
    path = broken(tmp_path, edit)
    with pytest.raises(LGFormerError) as info:
        from_instances(path, COCO / "images", tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert all(w in message for w in words), message
    data = json.loads(path.read_text())
    image = data["images"][0]["id"]
    culprit = (
        data["annotations"][0]
        if "image file" not in words[1]
        else next(a for a in data["annotations"] if a["image_id"] == image)
    )
    assert f"annotation {culprit['id']}" in message


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    path = broken(tmp_path, lambda d: d["annotations"][0].update(category_id=999))
    argv = [
        "-m",
        "lgformer.cli",
        "data",
        "from-instances",
        "--instances",
        str(path),
        "--images",
        str(COCO / "images"),
    ]
    run = subprocess.run(
        [sys.executable, *argv, "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "unknown category_id 999" in run.stderr


def test_training_mixes_sources(made: Path, tmp_path: Path) -> None:
    from conftest import synth_benchmark

    synth = synth_benchmark(tmp_path / "synth", 6, 0, 3)
    cfg = DataConfig(root=str(made), dataset="instances", image_size=64, mix=[f"synth:{synth}"])
    alone = build_dataset(DataConfig(root=str(made), dataset="instances", image_size=64), "train", train=True)
    mixed = build_dataset(cfg, "train", train=True)
    assert len(mixed) == len(alone) + 6
    assert {str(r.ref_id).split(":")[0] for r in mixed.referents[len(alone) :]} == {"synth"}
    assert len(build_dataset(cfg, "val", train=False)) == len(build_dataset(cfg, "val", train=False, seed=1))
    with pytest.raises(LGFormerError, match="data.mix"):
        build_dataset(DataConfig(root=str(made), dataset="instances", mix=["refcoco:x"]), "train", train=True)
    assert main(["data", "stats", "--root", str(made), "--dataset", "instances"]) == 0
