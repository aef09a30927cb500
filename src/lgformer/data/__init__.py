"""Datasets: the REFER release, a custom JSONL format and a synthetic referring benchmark.

The public names below are imported lazily (on first use), so that importing `lgformer.data.commands` for
the CLI's `--help` does not load torch or pycocotools.
"""

from __future__ import annotations

from lgformer.lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "lgformer.config",
    "GT_RULES": "lgformer.config",
    "ReferDataset": "lgformer.data.dataset",
    "build_dataset": "lgformer.data.dataset",
    "collate": "lgformer.data.dataset",
    "BUCKETS": "lgformer.text.lengths",
    "count_words": "lgformer.text.lengths",
    "length_bucket": "lgformer.text.lengths",
    "load_image": "lgformer.data.images",
    "MAX_PIXELS": "lgformer.data.images",
    "Referent": "lgformer.data.sources",
    "Sentence": "lgformer.data.sources",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
