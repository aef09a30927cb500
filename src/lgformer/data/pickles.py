"""Safe loading of REFER `refs(<split_by>).p` files.

They are Python-2 pickles (protocol 2) of plain lists, dicts, strings and numbers, none of which needs a
pickle global. The unpickler therefore resolves no global at all: whatever class or function a file names
(`os.system`, `copy_reg._reconstructor`, ...) is refused before anything is called. Python-2 byte strings
are read as bytes and decoded as UTF-8 (Latin-1 if that fails), so non-ASCII sentences survive.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, NoReturn

from lgformer.errors import LGFormerError


class _PlainDataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise LGFormerError(
            f"{self.path}: refused pickle global {module}.{name} "
            "(a refs file may hold only lists, dicts, strings and numbers)"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise LGFormerError(f"{self.path}: refused pickle persistent id (a refs file holds plain data only)")


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle `path` allowing no globals; bytes become str. Raises LGFormerError on anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LGFormerError(f"{path}: file not found") from None
    try:
        return _text(_PlainDataUnpickler(data, path).load())
    except RecursionError:
        raise LGFormerError(f"{path}: refused: nested too deeply for a refs file (a list of dicts)") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        AttributeError,
    ) as exc:
        raise LGFormerError(f"{path}: not a valid pickle ({type(exc).__name__}: {exc})") from None


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_text(v) for v in value)
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value
