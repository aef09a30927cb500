"""The Python API: `Segmenter.from_pretrained(...).predict(image, sentence)`.

Preprocessing is exactly the training transform (docs/architecture.md#inputs-image-and-ground-truth): PIL
bilinear resize to S x S (S is
the checkpoint's `data.image_size`), ImageNet mean/std; the 1/4-scale logits of the last output are upsampled
bilinearly straight to the original image size (as the engine's `original` evaluation protocol does) and
thresholded. Sentences are tokenised with the checkpoint's tokenizer and its 20-token slicing rule. A model
with the no-target head also says whether anything matches: where it says nothing does, the mask is empty and
`Prediction.no_target` is set.

Bad inputs raise `LGFormerError` (missing/corrupt/undersized images, empty expressions, expressions with no
known word); inputs the model can still read but not fully (too many tokens, characters outside the
vocabulary) emit an `InputWarning`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lgformer.checkpoint import load_model, resolve_checkpoint
from lgformer.config import Config
from lgformer.data.images import image_tensor, load_image, to_rgb
from lgformer.errors import LGFormerError
from lgformer.precision import autocast, autocast_dtype, pick_device, tune_cpu_allocator
from lgformer.shipped import DEFAULT_MODEL
from lgformer.text.tokenizer import Tokenizer

MIN_SIDE = 16  # smaller images hold nothing to segment (the network sees them blown up to S x S)

ImageInput = str | Path | Image.Image | np.ndarray


class InputWarning(UserWarning):
    """The model reads an input only in part: a truncated expression or words outside its vocabulary."""


@dataclass
class Prediction:
    """One expression's result at the original image size."""

    sentence: str
    mask: np.ndarray  # bool (H, W); empty when `no_target`
    probability: np.ndarray  # float32 (H, W), sigmoid of the upsampled logits
    score: float  # mean probability inside the mask (0 for an empty mask)
    bbox: tuple[int, int, int, int] | None  # (x, y, width, height) of the mask in pixels, COCO style
    no_target: bool = False  # the no-target head says nothing in the image matches
    target_score: float | None = None  # its probability that something matches (None: a model without it)


def read_image(image: ImageInput) -> Image.Image:
    """A path (decoded with `load_image`, EXIF orientation applied), PIL image or H x W x 3 uint8 array ->
    RGB PIL image; refuses images too small to hold an object."""
    if isinstance(image, (str, Path)):
        picture, where = load_image(image, exif_transpose=True), str(image)
    elif isinstance(image, Image.Image):
        picture, where = to_rgb(image, Path("<PIL image>")), "image"
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise LGFormerError(
                f"image array must be H x W x 3 uint8, got shape {image.shape} dtype {image.dtype}"
            )
        picture, where = Image.fromarray(image, "RGB"), "image"
    else:
        raise LGFormerError(f"image must be a path, PIL image or numpy array, not {type(image).__name__}")
    if min(picture.size) < MIN_SIDE:
        raise LGFormerError(
            f"{where}: {picture.width}x{picture.height} image is too small to segment "
            f"(at least {MIN_SIDE}x{MIN_SIDE} pixels)"
        )
    return picture


def encode_sentences(tokenizer: Tokenizer, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (B, max_tokens) by the training rule; rejects empty expressions and ones
    with no known word, and warns (`InputWarning`) when the model will read one only in part."""
    if isinstance(sentences, str) or not sentences:
        raise LGFormerError("give one or more expressions")
    for sentence in sentences:
        if not isinstance(sentence, str):
            raise LGFormerError(f"expression {sentence!r}: expected a string, got {type(sentence).__name__}")
        if not sentence.strip():
            raise LGFormerError("empty expression: describe the object, e.g. 'the red car on the left'")
    unk = tokenizer.encode(["[UNK]"])[0][1]  # special tokens are never split
    limit = tokenizer.max_tokens
    for sentence, ids in zip(sentences, tokenizer.encode(list(sentences))):
        if all(i == unk for i in ids[1:-1]):
            raise LGFormerError(
                f"expression {_quote(sentence)} has no word the model knows (its vocabulary is English "
                "wordpieces; emoji and most symbols are unknown)"
            )
        words = sentence.split()
        pieces = tokenizer.encode(words)  # per word: [CLS] wordpieces [SEP]
        unknown = [w for w, w_ids in zip(words, pieces) if unk in w_ids]
        if unknown:
            warnings.warn(
                f"expression {_quote(sentence)}: {', '.join(map(repr, unknown[:5]))} not in the model's "
                "vocabulary (read as [UNK])",
                InputWarning,
                stacklevel=3,
            )
        if len(ids) > limit:
            kept = int((np.cumsum([len(p) - 2 for p in pieces]) <= limit - 1).sum())
            warnings.warn(
                f"expression {_quote(sentence)} is {len(ids)} tokens long; the model reads only the first "
                f"{limit}, i.e. the first {kept} of {len(words)} words",
                InputWarning,
                stacklevel=3,
            )
    return tokenizer(list(sentences))


class Segmenter:
    """A loaded model with its tokenizer and transform: `predict(image, sentence | [sentences])`."""

    def __init__(
        self, model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        if device.type == "cpu":
            tune_cpu_allocator()
        self.model = model.eval()
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.image_size = cfg.data.image_size
        self.tokenizer = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "fp32",
        overrides: Sequence[str] = (),
    ) -> Segmenter:
        """Load a checkpoint folder or a shipped model name; `overrides` are config `key=value` items
        (e.g. `data.image_size=384` to run at another resolution); `dtype` is the precision: fp32, bf16 or
        fp16 (GPU), or torch's float32, bfloat16, float16."""
        dev = pick_device(device)
        compute = autocast_dtype(dtype, dev)
        model, cfg = load_model(resolve_checkpoint(source), dev, tuple(overrides))
        return cls(model, cfg, dev, compute)

    def predict(
        self,
        image: ImageInput,
        text: str | Sequence[str],
        threshold: float = 0.5,
        batch_size: int = 8,
        no_target_threshold: float = 0.5,
    ) -> Prediction | list[Prediction]:
        """Segment what `text` names in `image`; a list of sentences gives a list of predictions, run
        `batch_size` at a time. A pixel belongs to the object where its probability exceeds `threshold`; with
        the no-target head, nothing matches where its no-target probability exceeds `no_target_threshold`."""
        for name, value in (("threshold", threshold), ("no_target_threshold", no_target_threshold)):
            if not 0.0 < value < 1.0:
                raise LGFormerError(f"{name} {value} must be strictly between 0 and 1")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LGFormerError(f"batch_size {batch_size!r} must be a whole number >= 1")
        if not isinstance(text, (str, Iterable)):
            raise LGFormerError(f"text: expected an expression or a list of them, got {type(text).__name__}")
        sentences = [text] if isinstance(text, str) else list(text)
        ids, text_mask = encode_sentences(self.tokenizer, sentences)
        picture = read_image(image)
        pixels = image_tensor(picture, self.image_size)[None].to(self.device)
        cut = math.log(threshold / (1.0 - threshold))  # threshold on the logit: 0.5 -> logits > 0 exactly
        results = []
        for start in range(0, len(sentences), batch_size):
            rows = slice(start, start + batch_size)
            n = len(sentences[rows])
            with torch.inference_mode(), autocast(self.device, self.dtype):
                logits, target = self.model(
                    pixels.expand(n, -1, -1, -1),
                    text_mask[rows].to(self.device),
                    ids=ids[rows].to(self.device),
                    upsample=False,
                    all_outputs=False,
                    with_target=True,
                )
            full = F.interpolate(
                logits.float(),
                size=(picture.height, picture.width),
                mode="bilinear",
                align_corners=False,
            )[:, 0].cpu()
            scores = [None] * n if target is None else target.float().sigmoid().cpu().tolist()
            for sentence, row, something in zip(sentences[rows], full, scores):
                nothing = something is not None and 1.0 - something > no_target_threshold
                results.append(_prediction(sentence, row, cut, nothing, something))
        return results[0] if isinstance(text, str) else results


def _prediction(
    sentence: str, logits: torch.Tensor, cut: float, no_target: bool, target_score: float | None
) -> Prediction:
    mask = (logits > cut).numpy() & (not no_target)
    probability = torch.sigmoid(logits).numpy()
    bbox = None
    if mask.any():
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    score = float(probability[mask].mean()) if mask.any() else 0.0
    return Prediction(sentence, mask, probability, score, bbox, no_target, target_score)


def _quote(sentence: str, limit: int = 40) -> str:
    return repr(sentence if len(sentence) <= limit else sentence[: limit - 3] + "...")
