"""refs(*).p files are unpickled without resolving any global: code in a crafted file never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from lgformer.data import DataConfig, build_dataset
from lgformer.data.pickles import load_plain_pickle
from lgformer.errors import LGFormerError


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_refs_pickle_is_refused_and_does_nothing(
    shared_data: Path, writable_copy, tmp_path
) -> None:
    root = writable_copy(shared_data / "refcoco-mini")
    marker = tmp_path / "pwned"
    refs_path = root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps([{"ref_id": 1, "sentences": _Payload(f"touch {marker}")}], protocol=2))
    with pytest.raises(LGFormerError) as exc:
        build_dataset(DataConfig(root=str(root)), "val", train=False)
    message = str(exc.value)
    assert message.startswith(f"{refs_path}: refused pickle global ")
    assert f"{os.system.__module__}.system" in message and "\n" not in message
    assert not marker.exists()


def test_every_global_is_refused_even_harmless_ones(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{1, 2}], protocol=2))  # a set needs the builtins.set global
    with pytest.raises(LGFormerError, match=r"refused pickle global (__builtin__|builtins)\.set"):
        load_plain_pickle(path)


def test_python2_byte_strings_become_text(tmp_path: Path) -> None:
    # protocol 2 as Python 2 writes it: SHORT_BINSTRING ('U') for str, BINUNICODE ('X') for unicode
    data = (
        b"\x80\x02]q\x00}q\x01(U\x03rawq\x02U\x05caf\xc3\xa9q\x03X\x05\x00\x00\x00splitq\x04U\x03valq\x05ua."
    )
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    assert load_plain_pickle(path) == [{"raw": "café", "split": "val"}]


def test_truncated_pickle_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"a": 1}], protocol=2)[:-3])
    with pytest.raises(LGFormerError, match="not a valid pickle"):
        load_plain_pickle(path)
