"""Sentence lengths: the paper's word-length buckets and the statistics printed by `lgformer data stats`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BUCKETS = ("1-2", "3-7", "8-12", "13+")  # the paper's [1,3), [3,8), [8,13), [13,inf) words
TOKEN_PERCENTILES = (50, 90, 95, 99)


def count_words(sentence: str) -> int:
    """Sentence length in words (whitespace-separated), the unit of the paper's length buckets."""
    return len(sentence.split())


def length_bucket(words: int) -> str:
    """The paper's bucket name for a sentence of `words` words."""
    if words < 3:
        return BUCKETS[0]
    if words < 8:
        return BUCKETS[1]
    if words < 13:
        return BUCKETS[2]
    return BUCKETS[3]


def sentence_stats(
    sentences: Sequence[str], encode: Callable[[list[str]], list[list[int]]] | None, max_tokens: int
) -> dict[str, Any]:
    """Word-length histogram over the paper's buckets and, given `encode` (full wordpiece ids with
    [CLS]/[SEP]), token-length percentiles and how many sentences the `max_tokens` slicing truncates."""
    words = np.array([count_words(s) for s in sentences], dtype=np.int64)
    buckets = dict.fromkeys(BUCKETS, 0)
    for n in words.tolist():
        buckets[length_bucket(n)] += 1
    stats: dict[str, Any] = {
        "words_mean": round(float(words.mean()), 3) if len(words) else 0.0,
        "words_max": int(words.max()) if len(words) else 0,
        "length_buckets": buckets,
    }
    if encode is not None and len(sentences):
        tokens = np.array([len(ids) for ids in encode(list(sentences))], dtype=np.int64)
        truncated = int((tokens > max_tokens).sum())
        stats["tokens"] = {
            **{f"p{q}": float(np.percentile(tokens, q)) for q in TOKEN_PERCENTILES},
            "max": int(tokens.max()),
            "max_tokens": max_tokens,
            "truncated": truncated,
            "truncated_share": round(truncated / len(tokens), 6),
        }
    return stats
