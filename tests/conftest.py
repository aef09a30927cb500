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


def synth_benchmark(out: Path, train: int, val: int, test: int) -> Path:
    """A toy synthetic benchmark (96 px scenes) written to `out` by `lgformer data synth`."""
    from lgformer.cli import main

    argv = f"data synth --out {out} --train {train} --val {val} --test {test} --size 96 --workers 1"
    assert main(argv.split()) == 0
    return out


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
SHARED_NAMES = ("SHARED", "OFFICIAL", "MINI", "PHOTOS")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `slow` the files and tests above, ONNX exports and official presets anywhere, and `shared` every
    test that reads ../shared (a module using its paths, or the `shared_data` fixture)."""
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
        module = getattr(item, "module", None)
        if "shared_data" in getattr(item, "fixturenames", ()) or any(
            name in vars(module) for name in SHARED_NAMES if module is not None
        ):
            item.add_marker(pytest.mark.shared)
