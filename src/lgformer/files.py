"""Writing outputs safely: atomic files and folders, and output locations checked before the work starts.

A reader never sees half a file or half a checkpoint folder, and an interrupted run leaves the old one
intact: files go to a temporary name beside their target and are renamed over it; a folder (a checkpoint)
is written whole into a temporary folder, synced, and swapped in, the old folder kept as `<name>.prev`
until the new one is in place (`recover_folder` finishes or undoes an interrupted swap).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lgformer.errors import LGFormerError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
CRASH_ENV = "LGFORMER_TEST_CRASH_AT"  # tests only: "<stage>:<n>" ends the process at the n-th such point


def crash_point(stage: str) -> None:
    """For the kill-during-save tests: `os._exit` at the n-th `stage` when LGFORMER_TEST_CRASH_AT says so."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or spec.rsplit(":", 1)[0] != stage:
        return
    seen = _CRASH_COUNTS[stage] = _CRASH_COUNTS.get(stage, 0) + 1
    if seen == int(spec.rsplit(":", 1)[1]):
        os._exit(137)


_CRASH_COUNTS: dict[str, int] = {}


def make_parent(path: Path) -> None:
    """Create `path`'s folder, or say in one line why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LGFormerError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None


def atomic_write(path: str | Path, data: bytes | str | Callable[[str], None]) -> None:
    """Write `data` (bytes, text, or a function that writes a given path) to a temporary file beside `path`,
    then rename it over `path`. The file gets the permissions a plain `open(path, "w")` would give it."""
    path = Path(path)
    make_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise LGFormerError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            if not callable(data):
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        if callable(data):
            data(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path` to write into; when the block ends, its files are synced
    and it replaces `path`: the old folder becomes `<name>.prev`, the new one is renamed in, then `.prev`
    is removed. At every instant `path` or `<name>.prev` is complete. On an exception the temporary folder
    goes."""
    path = Path(path)
    make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise LGFormerError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield tmp
        for item in tmp.iterdir():
            _fsync(item)
        os.chmod(tmp, 0o777 & ~_UMASK)
        _fsync(tmp)
        crash_point("folder-written")
        previous = path.with_name(path.name + ".prev")
        if path.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
            crash_point("folder-moved-aside")
        os.replace(tmp, path)
        _fsync(path.parent)
        crash_point("folder-swapped")
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_folder(path: str | Path) -> str | None:
    """Finish or undo a folder swap an interrupted `atomic_folder` left: temporary folders are removed, a
    lone `<name>.prev` becomes `path` again. Returns what was done, or None."""
    path = Path(path)
    if not path.parent.is_dir():
        return None
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    previous = path.with_name(path.name + ".prev")
    if not previous.exists():
        return None
    if path.exists():  # the new folder made it in before the old one was removed
        shutil.rmtree(previous, ignore_errors=True)
        return None
    os.replace(previous, path)
    return f"{path}: the run was interrupted while saving; continuing from the previous checkpoint"


def check_output_folder(path: str | Path, what: str = "--out") -> Path:
    """Before any work: `path` must be a folder, or a place where one can be made, that can be written.
    Nothing is left behind: a probe folder is made in the nearest existing ancestor and removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LGFormerError(f"{what} {path}: is a file, expected a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LGFormerError(f"{what} {path}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lgformer-probe-", dir=existing))
    except OSError as exc:
        raise LGFormerError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """Before any work: `path` must not be a folder; its folder must exist or be creatable, and writable."""
    path = Path(path)
    if path.is_dir():
        raise LGFormerError(f"{what} {path}: is a folder, expected a file name")
    check_output_folder(path.parent if str(path.parent) else Path("."), what=f"{what} {path}: its folder")
    return path
