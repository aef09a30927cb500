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
from lgformer.data.synth.grammar import UNKNOWN, Desc, Obj, level, parse, resolve
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


# ------------------------------------------------------------------ generalized: several objects, or none

# The classic output's bytes for the `made` fixture (seed 3, one copy-paste), as the code before the plural
# and absent kinds wrote them (measured with the commit before them): a change of the classic bytes fails.
CLASSIC_SHA256 = "130c239489e89809033b981c05f8501fee37057288a8d63a695b1cb9bfaa2793"


def digest(root: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_the_classic_dataset_keeps_its_bytes(made: Path) -> None:
    assert digest(made) == CLASSIC_SHA256


@pytest.fixture(scope="module")
def general(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("general")
    out = folder / "g"
    path = subset(folder, train=12, val=3)
    from_instances(path, COCO / "images", out, COCO / "splits.json", seed=3, plural=0.15, absent=0.15)
    return out


def test_plural_and_absent_refs_name_exactly_their_sets(general: Path) -> None:
    """Plural refs name their two or more objects, read back by the interpreter; absent ones name nothing;
    the shares come near the ones asked for; the loader gives the union of the masks, or an empty one."""
    from lgformer.data.sources import target_kind
    from lgformer.data.synth.grammar import resolve_set

    lex = lexicon(
        sorted({c["name"] for c in json.loads((COCO / "instances.json").read_text())["categories"]})
    )
    refs = load_plain_pickle(general / "instances" / "refs(instances).p")
    scenes = scene_graphs(general)
    kinds: dict[str, int] = {"single": 0, "plural": 0, "absent": 0}
    for ref in refs:
        ids, objs = scenes[ref["image_id"]]
        if isinstance(ref["ann_id"], int):
            kinds["single"] += 1
            continue
        members = () if ref["no_target"] else tuple(ids.index(a) for a in ref["ann_id"])
        assert ref["no_target"] == (ref["ann_id"] == [-1]) and len(members) != 1
        kinds["absent" if ref["no_target"] else "plural"] += 1
        for sentence in ref["sentences"]:
            desc = parse(sentence["raw"], lex)
            assert resolve_set(desc, objs) == members, sentence["raw"]
            assert level(desc, lex) == ref["level"]
    total = sum(kinds.values())
    assert kinds["plural"] >= 5 and kinds["absent"] >= 5, kinds
    assert 0.05 <= kinds["plural"] / total <= 0.25 and 0.05 <= kinds["absent"] / total <= 0.25, kinds

    data = build_dataset(DataConfig(root=str(general), dataset="instances", image_size=64), "train", False)
    by_kind = {}
    for k in range(len(data)):
        by_kind.setdefault(target_kind(data.referent(k).targets), k)
    assert set(by_kind) == {"single", "multi", "no-target"}, set(by_kind)
    assert data[by_kind["no-target"]]["mask"].sum() == 0 and data[by_kind["multi"]]["mask"].sum() > 0


def test_crowds_and_specks_are_never_in_a_set_nor_fit_an_absence() -> None:
    """Objects without a referent mask of their own (a crowd of people, a dog too small to keep) stay in the
    scene graph, attributes unknown: "all the people" is never said where the crowd would belong to it, and
    no absent description is one they might fit ("the dog" when a tiny dog is there)."""
    from lgformer.data.instances.generate import set_refs
    from lgformer.data.synth.grammar import resolve_set

    lex = lexicon(["person", "car", "dog", "cat", "truck"])
    objs = [
        Obj("person", "red", UNKNOWN, UNKNOWN, 40, 50, 10),
        Obj("person", "blue", UNKNOWN, UNKNOWN, 100, 50, 10),
        Obj("car", "white", MIDDLE, UNKNOWN, 160, 80, 10),
        Obj("car", "black", "large", UNKNOWN, 220, 80, 20),
    ]
    hidden = [
        Obj("person", UNKNOWN, UNKNOWN, UNKNOWN, 300, 40, 30),
        Obj("dog", UNKNOWN, UNKNOWN, UNKNOWN, 5, 5, 2),
    ]
    swaps = {"person": ["dog", "cat"], "car": ["truck"]}
    sets = [
        s
        for seed in range(40)
        for s in set_refs(objs, hidden, lex, np.random.default_rng(seed), (1, 1), swaps)
    ]
    plural = [(members, texts) for members, _, texts in sets if members]
    absent = [texts for members, _, texts in sets if not members]
    assert plural and absent
    assert all(members == (2, 3) for members, _ in plural), plural  # the two cars: never the people
    said = {t for texts in absent for t in texts}
    assert not any(parse(t, lex).shape in ("dog", "person") for t in said), said
    assert any(parse(t, lex).shape in ("cat", "truck") for t in said), said  # the swapped nouns
    assert all(resolve_set(parse(t, lex), objs + hidden) == () for t in said)
    assert not {"the gray car", "the grey car"} & said  # white's neighbour is never an absence
    for text in said:  # nor does an absence hinge on a size, which is relative: without it, still nothing
        desc = parse(text, lex)
        sizeless = Desc(desc.shape, tuple(a for a in desc.attrs if a[0] != "size"))
        assert resolve_set(sizeless, objs + hidden) == (), text


def test_generalized_flags_need_generalized(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["data", "from-instances", "--instances", "x.json", "--images", "x", "--out", str(tmp_path / "o")]
    assert main([*argv, "--plural", "0.1"]) == 2
    assert "--plural and --absent need --generalized" in capsys.readouterr().err
    assert main([*argv, "--generalized", "--absent", "0.5"]) == 2
    assert "--absent 0.5: a share of the refs between 0 and 0.2" in capsys.readouterr().err
