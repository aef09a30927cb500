"""The torch dataset every engine path uses, built from a `DataConfig` (the `data` section of the config).

Evaluation visits every (ref, sentence) pair. A training epoch visits every ref once with one sentence drawn
at random (the authors' protocol, docs/architecture.md#training-recipe), or every pair with `all_sentences`.
The random draw depends only
on (seed, epoch, ref index), so a resumed run sees exactly the sentences an uninterrupted run would: call
`set_epoch(epoch)` before each epoch (and before creating that epoch's DataLoader iterator).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lgformer.config import GENERATED, GREFCOCO, JSONL, DataConfig, check_rule
from lgformer.data.images import image_tensor, load_image, mask_tensor
from lgformer.data.sources import (
    Referent,
    Sentence,
    load_grefcoco,
    load_jsonl,
    load_refer,
    referent_mask,
)
from lgformer.errors import LGFormerError
from lgformer.text.lengths import count_words

if TYPE_CHECKING:
    from lgformer.text.tokenizer import Tokenizer


def load_referents(cfg: DataConfig) -> list[Referent]:
    """Every referent of the configured source, all splits."""
    return _load_source(cfg.dataset, cfg.root, cfg.split_by, cfg.image_dir)


def _load_source(dataset: str, root: str, split_by: str, image_dir: str | None) -> list[Referent]:
    if dataset == JSONL:
        return load_jsonl(root, image_dir)
    if dataset == GREFCOCO:
        return load_grefcoco(root, split_by, image_dir)
    return load_refer(root, dataset, dataset if dataset in GENERATED else split_by, image_dir)


def mixed_referents(cfg: DataConfig, split: str) -> list[Referent]:
    """The `split` referents of every `data.mix` source, their ref ids prefixed with the source."""
    out = []
    for entry in cfg.mix:
        dataset, root = entry.split(":", 1)
        for ref in select_split(_load_source(dataset, root, dataset, None), split, root):
            out.append(dataclasses.replace(ref, ref_id=f"{dataset}:{ref.ref_id}"))
    return out


def select_split(referents: list[Referent], split: str, source: str) -> list[Referent]:
    """The referents of `split` (exact name: `test` is not `testA`)."""
    chosen = [ref for ref in referents if ref.split == split]
    if not chosen:
        splits = sorted({ref.split for ref in referents})
        raise LGFormerError(f"{source}: no referents in split {split!r}; splits present: {', '.join(splits)}")
    return chosen


class ReferDataset(Dataset):
    """Items are dicts: image (3,S,S) normalised, mask (S,S) 0/1 float, [ids, text_mask (T,) long],
    sentence, sent_id, ref_id, level, words, targets (objects named: 0 for no target), index."""

    def __init__(
        self,
        referents: list[Referent],
        *,
        train: bool,
        image_size: int,
        gt_rule: str = "exactly_one",
        all_sentences: bool = False,
        tokenizer: Tokenizer | None = None,
        seed: int = 0,
    ) -> None:
        check_rule(gt_rule)
        self.referents = referents
        self.train = train
        self.image_size = image_size
        self.gt_rule = gt_rule
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.random_sentence = train and not all_sentences
        # (referent index, sentence index); sentence index -1 means "draw one at random this epoch"
        if self.random_sentence:
            self.items = [(r, -1) for r in range(len(referents))]
        else:
            self.items = [(r, s) for r, ref in enumerate(referents) for s in range(len(ref.sentences))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def referent(self, index: int) -> Referent:
        return self.referents[self.items[index][0]]

    def sentence(self, index: int) -> Sentence:
        """The sentence item `index` uses (for training: the one drawn for the current epoch)."""
        r, s = self.items[index]
        sentences = self.referents[r].sentences
        if s < 0:
            rng = np.random.default_rng([self.seed, self.epoch, r])
            s = int(rng.integers(len(sentences)))
        return sentences[s]

    def image_path(self, index: int) -> Path:
        return self.referent(index).image

    def original_mask(self, index: int) -> np.ndarray:
        """Ground truth at the image's original size, bool (H, W) (the `original` evaluation protocol)."""
        return referent_mask(self.referent(index), self.gt_rule)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ref = self.referent(index)
        sentence = self.sentence(index)
        image = load_image(ref.image)
        mask = referent_mask(ref, self.gt_rule)
        if (image.height, image.width) != mask.shape:
            raise LGFormerError(
                f"{ref.image}: decoded image is {image.width}x{image.height} but {ref.where} declares "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        item: dict[str, Any] = {
            "image": image_tensor(image, self.image_size),
            "mask": mask_tensor(mask, self.image_size),
            "sentence": sentence.text,
            "sent_id": sentence.sent_id,
            "ref_id": ref.ref_id,
            "level": ref.level,
            "words": count_words(sentence.text),
            "targets": ref.targets,
            "index": index,
        }
        if self.tokenizer is not None:
            ids, text_mask = self.tokenizer([sentence.text])
            item["ids"], item["text_mask"] = ids[0], text_mask[0]
        return item


def build_dataset(
    cfg: DataConfig, split: str, train: bool, tokenizer: Tokenizer | None = None, seed: int = 0
) -> ReferDataset:
    """The dataset of `split` of the configured source (see the module docstring for the item protocol)."""
    referents = select_split(load_referents(cfg), split, cfg.root)
    if train and cfg.mix:
        referents += mixed_referents(cfg, split)
    return ReferDataset(
        referents,
        train=train,
        image_size=cfg.image_size,
        gt_rule=cfg.gt_rule,
        all_sentences=cfg.all_sentences,
        tokenizer=tokenizer,
        seed=seed,
    )


_STACKED = ("image", "mask", "ids", "text_mask")
_INTEGERS = ("level", "words", "targets", "index")


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors, make long tensors of level/words/targets/index, keep lists for sentences and ids."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key in _STACKED:
            out[key] = torch.stack(values)
        elif key in _INTEGERS:
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
