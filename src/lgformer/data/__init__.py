"""Datasets: the REFER release, a custom JSONL format and a synthetic referring benchmark.

The public names below are imported lazily (on first use), so that importing `lgformer.data.commands` for
the CLI's `--help` does not load torch or pycocotools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "dataset",
    "ReferDataset": "dataset",
    "build_dataset": "dataset",
    "collate": "dataset",
    "BUCKETS": "text",
    "count_words": "text",
    "length_bucket": "text",
    "load_image": "images",
    "MAX_PIXELS": "images",
    "GT_RULES": "masks",
    "Referent": "sources",
    "Sentence": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lgformer.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lgformer.data.{_EXPORTS[name]}"), name)
