"""Shared fixtures. The real test data lives beside the repository: <root>/main (this repo), <root>/shared."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHOTOS = SHARED / "data" / "refcoco-mini" / "images" / "mscoco" / "images" / "train2014"  # real COCO photos


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
