"""Shared fixtures. The real test data lives beside the repository: <root>/main (this repo), <root>/shared."""

from __future__ import annotations

import importlib.util
import struct
import sys
import zlib
from functools import cache
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
OFFICIAL = SHARED / "reference" / "official"  # the authors' tensor layout and the golden forward pass
MINI = SHARED / "data" / "refcoco-mini"  # three real RefCOCO referents in the REFER layout
PHOTOS = MINI / "images" / "mscoco" / "images" / "train2014"  # their real COCO photos
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@cache
def load_benchmark(name: str):
    """The script `benchmarks/<name>.py` as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def bomb_png_header(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def save_lite_checkpoint(folder: Path, *overrides: str) -> Path:
    """A lite checkpoint (pretrained encoders, untrained heads: fine for mechanics) stored like the shipped
    one, MiniLM left out; `overrides` such as "data.image_size=128" keep it small."""
    from lgformer import config as config_mod
    from lgformer.checkpoint import save_model
    from lgformer.model.build import build_model

    cfg = config_mod.load("lite", list(overrides))
    save_model(folder, build_model(cfg.model, pretrained=True), cfg, exclude=("text_encoder.",))
    return folder


HEAD = ("data.image_size=96", "model.no_target_head=true")  # a small lite model with the no-target head


def head_checkpoint(folder: Path, says: float | None, *overrides: str) -> Path:
    """A lite checkpoint with the head; `says` fixes its answer: the last layer's weights zeroed and its
    bias set to `says` (a logit: -20 is "nothing matches" for every input, +20 "something")."""
    from lgformer import config as config_mod
    from lgformer.checkpoint import save_model
    from lgformer.model.build import build_model

    cfg = config_mod.load("lite", [*HEAD, *overrides])
    model = build_model(cfg.model, pretrained=True)
    if says is not None:
        with torch.no_grad():
            model.target_head.mlp[4].weight.zero_()
            model.target_head.mlp[4].bias.fill_(says)
    save_model(folder, model, cfg, exclude=("text_encoder.",))
    return folder


def synth_benchmark(out: Path, train: int, val: int, test: int) -> Path:
    """A toy synthetic benchmark (96 px scenes) written to `out` by `lgformer data synth`."""
    from lgformer.cli import main

    argv = f"data synth --out {out} --train {train} --val {val} --test {test} --size 96 --workers 1"
    assert main(argv.split()) == 0
    return out


# gRefCOCO fixture: the three refcoco-mini photos with, per photo, the real RefCOCO ref (one object), a plural
# sentence naming it and a second object (a hand-drawn box polygon around that object, made for this fixture:
# gRefCOCO's masks for these photos are not on this machine), and a sentence naming nothing in the photo.
GREF_SECOND_OBJECTS = {  # image id -> (annotation id, category id, box x0, y0, x1, y1) of the second object
    460370: (910000, 1, 243, 74, 348, 422),  # the man in the beige coat, standing further back
    157714: (910001, 88, 100, 70, 300, 235),  # the small teddy bear the baby hugs
    363252: (910002, 1, 150, 300, 245, 499),  # the young man in the middle, by the pole
}
GREF_SENTENCES = {  # image id -> (split, plural sentence, no-target sentence)
    460370: ("train", "the two men standing on the platform", "the dog on the platform"),
    157714: ("val", "both teddy bears", "the cat on the rug"),
    363252: ("testA", "the two young men", "the horse by the stop sign"),
}


@cache
def grefcoco_fixture(root: Path) -> Path:
    """DATA_ROOT in gRefCOCO's layout (ReLA's): grefcoco/grefs(unc).json, grefcoco/instances.json and the
    photos under images/train2014; 9 refs (3 single, 3 multi, 3 no-target), split by image."""
    import json
    import pickle
    import shutil

    (root / "grefcoco").mkdir(parents=True)
    (root / "images" / "train2014").mkdir(parents=True)
    instances = json.loads((MINI / "refcoco" / "instances.json").read_text())
    with open(MINI / "refcoco" / "refs(unc).p", "rb") as handle:
        refcoco = pickle.load(handle)  # the shared fixture: trusted, written by the task's authors
    refs = []
    for ref in refcoco:
        image_id = ref["image_id"]
        image = next(img for img in instances["images"] if img["id"] == image_id)
        shutil.copy(PHOTOS / image["file_name"], root / "images" / "train2014" / image["file_name"])
        ann_id, category, x0, y0, x1, y1 = GREF_SECOND_OBJECTS[image_id]
        box = [x0, y0, x1, y0, x1, y1, x0, y1]
        instances["annotations"].append(
            {
                "id": ann_id,
                "image_id": image_id,
                "category_id": category,
                "segmentation": [box],
                "area": (x1 - x0) * (y1 - y0),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "iscrowd": 0,
            }
        )
        split, plural, absent = GREF_SENTENCES[image_id]
        sent_id = 100 * ref["ref_id"]
        for k, (ann_ids, texts) in enumerate(
            (
                ([ref["ann_id"]], [s["raw"] for s in ref["sentences"]]),
                ([ref["ann_id"], ann_id], [plural]),
                ([-1], [absent]),
            )
        ):
            sentences = [
                {"tokens": t.split(), "raw": t, "sent": t, "sent_id": sent_id + 10 * k + j}
                for j, t in enumerate(texts)
            ]
            refs.append(
                {
                    "ref_id": 10 * ref["ref_id"] + k,
                    "ann_id": ann_ids,
                    "image_id": image_id,
                    "split": split,
                    "sentences": sentences,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "category_id": [ref["category_id"]] if ann_ids != [-1] else [-1],
                    "no_target": ann_ids == [-1],
                    "file_name": image["file_name"],
                }
            )
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    return root


@pytest.fixture(scope="session")
def grefcoco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grefcoco_fixture(tmp_path_factory.mktemp("grefcoco"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast as two, and does not collapse when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<root>/shared/data`: refcoco-mini (REFER layout) and the public sentence CSVs."""
    path = SHARED / "data"
    assert path.is_dir(), (
        f"test data not found at {path} (expected the repo at <root>/main, data at <root>/shared)"
    )
    return path


@pytest.fixture()
def writable_copy(tmp_path: Path):
    """copy(src) -> a writable copy of a (read-only) shared folder under tmp_path."""

    def copy(src: Path) -> Path:
        import shutil

        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        for path in [dst, *dst.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return dst

    return copy


# Whole files of end-to-end work: training runs, DDP, the browser, ONNX export, the training golden, the
# command line run as a user runs it. `make test-fast` leaves them out (`-m "not slow"`).
SLOW_FILES = {
    "test_app_demo_train.py",
    "test_app_serve.py",
    "test_bad_inputs.py",
    "test_benchmark_ablation.py",
    "test_crash_safety.py",
    "test_engine_ddp.py",
    "test_engine_train.py",
    "test_onnx.py",
    "test_shipped_model.py",
    "test_training_golden.py",
}
# The paper-sized networks (Swin + BERT-base) outside the forward golden check itself: every test run on an
# official preset (its parametrisation id names it) and these end-to-end conversions and golden variants.
SLOW_TESTS = {
    "test_authors_checkpoint_converts_and_predicts_on_a_photo",
    "test_bad_checkpoints_are_named",
    "test_bf16_masks_agree_with_fp32_golden",
    "test_convert_official_checkpoint_end_to_end",
    "test_verify_official_any_batch_size_and_partial_golden",
}
SHARED_NAMES = ("SHARED", "OFFICIAL", "MINI", "PHOTOS", "grefcoco_fixture")
# Files whose tests need most of the machine's memory (the training golden trains Swin-T + BERT-base: ~7 GB a
# process, two under DDP): `make test` runs them by themselves after the parallel pass (`-m alone`).
ALONE_FILES = {"test_training_golden.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` the files and tests above, ONNX exports and official presets anywhere, `alone` the
    memory-heavy files, and `shared` every test that reads ../shared (a module using its paths, or the
    `shared_data` fixture)."""
    for item in items:
        path = Path(str(item.fspath))
        name = getattr(item, "originalname", item.name)
        if (
            path.name in SLOW_FILES
            or name in SLOW_TESTS
            or "onnx" in item.name
            or "[official-swin" in item.name
        ):
            item.add_marker(pytest.mark.slow)
        if path.name in ALONE_FILES:
            item.add_marker(pytest.mark.alone)
        module = getattr(item, "module", None)
        if {"shared_data", "grefcoco_root"} & set(getattr(item, "fixturenames", ())) or any(
            name in vars(module) for name in SHARED_NAMES if module is not None
        ):
            item.add_marker(pytest.mark.shared)
