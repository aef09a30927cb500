"""`lgformer export onnx`: the network as one ONNX file, checked against PyTorch with ONNX Runtime on export.

The graph (opset 18, written by PyTorch's dynamo exporter; GridSample is standard since opset 16):
  inputs   image           float32 (batch, 3, S, S), resized and normalised exactly as in training
           ids             int64   (batch, tokens), wordpiece ids, right-padded with 0
           attention_mask  int64   (batch, tokens), 1 on the ids, 0 on the padding
  output   logits          float32 (batch, S, S), the last output map at S x S: `logits > 0` is the mask
           match_logit     float32 (batch,), models with the no-target head only: `match_logit < 0` is
                           "nothing matches" (no-target probability sigmoid(-match_logit) > 0.5)
Dynamic axes: `batch` (any size) and `tokens` (2 up to the export's --max-tokens, itself at most the model's
`max_tokens`: the decoder's key table has that many rows). S is fixed at export (--size, default the
checkpoint's `data.image_size`). Upsampling to a photo's own size is left to the caller (bilinear).

Deformable attention: on CPU the model samples with a C kernel (the `native-sampler` fast path) or one
weighted `embedding_bag` over the four bilinear neighbours (`bag-sampler`); the export runs with both off
(`fast.disabled`), so the graph holds the plain `grid_sample` formulation
(docs/architecture.md#multi-scale-deformable-attention), which maps onto ONNX GridSample. The parity check
compares ONNX Runtime with the model as it runs in PyTorch, fast paths on, so it covers the difference.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lgformer.config import MIN_IMAGE_SIZE, Config
from lgformer.data.images import image_tensor
from lgformer.errors import LGFormerError
from lgformer.files import atomic_write
from lgformer.model import fast
from lgformer.text.tokenizer import Tokenizer

OPSET = 18
TOLERANCE = 1e-3  # max abs logit difference, ONNX Runtime vs PyTorch
INPUTS = ("image", "ids", "attention_mask")


class _Graph(nn.Module):
    """The exported signature: (image, ids, attention_mask) -> last logit map (batch, S, S) [, match logit
    (batch,) with the no-target head]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.outputs = ["logits"] if model.target_head is None else ["logits", "match_logit"]

    def forward(self, image: Tensor, ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        logits, target = self.model(image, attention_mask, ids=ids, all_outputs=False, with_target=True)
        return (logits[:, 0],) if target is None else (logits[:, 0], target)


def _clear_model_caches() -> None:
    """Empty the model's process-wide `lru_cache`s (position tables, Swin window orders and masks). They keep
    the tensors of their first call: one made under `inference_mode` cannot enter the traced graph, and
    tracing leaves fake tensors behind that would poison every later forward pass."""
    for name, module in list(sys.modules.items()):
        if name.startswith("lgformer.model."):
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


@contextlib.contextmanager
def _export_mode() -> Iterator[None]:
    """Sample the deformable attention with `grid_sample` and quiet the exporter's chatter (torchvision
    not installed, per-op constant folding, pytree deprecations); empty the model's caches on the way out."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), fast.disabled("native-sampler", "bag-sampler"):
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        _clear_model_caches()


def synthetic_check_input() -> tuple[Image.Image, str]:
    """A generated scene and one of its expressions: the parity check's input when none is given."""
    from lgformer.data.synth.generate import make_scene

    scene = make_scene(0, "test", 3, 320, 1)
    with Image.open(io.BytesIO(scene.jpeg)) as image:
        return image.convert("RGB"), scene.refs[0][1][0]


def export_onnx(
    model: nn.Module,
    cfg: Config,
    out: str | Path,
    image: Image.Image,
    sentence: str,
    size: int | None = None,
    max_tokens: int | None = None,
    optimize: bool = True,
) -> float:
    """Export `model` to `out` and check it with ONNX Runtime on `image` and `sentence` (batch 2 at full token
    length, then batch 1 at the sentence's own length, exercising both dynamic axes). Returns the max abs
    logit difference (over every output); above TOLERANCE the file is not written. `optimize=False` skips
    onnxscript's graph rewriting (about half the export time of a Swin model); ONNX Runtime still optimises
    the graph when it loads it."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - the dynamo exporter needs it
    except ImportError:
        raise LGFormerError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'lgformer[onnx]'"
        ) from None

    size = cfg.data.image_size if size is None else size
    max_tokens = cfg.model.max_tokens if max_tokens is None else max_tokens
    if max_tokens > cfg.model.max_tokens or max_tokens < 2:
        raise LGFormerError(
            f"--max-tokens {max_tokens}: must be between 2 and the model's {cfg.model.max_tokens}"
        )
    if size < MIN_IMAGE_SIZE:
        raise LGFormerError(f"--size {size}: too small (at least {MIN_IMAGE_SIZE})")
    graph = _Graph(model.eval().float().cpu())
    tokenizer = Tokenizer(cfg.model.text_encoder, max_tokens)
    ids, mask = tokenizer([sentence, sentence.split()[0]])
    pixels = image_tensor(image, size)[None].expand(2, -1, -1, -1).contiguous()
    length = int(mask[0].sum())
    cases = [(pixels, ids, mask), (pixels[:1], ids[:1, :length], mask[:1, :length])]
    _clear_model_caches()  # refilled just below with plain tensors (no_grad, not inference_mode)
    with torch.no_grad():
        expected = [[t.numpy() for t in graph(*case)] for case in cases]
    batch = torch.export.Dim("batch", min=1)
    tokens = torch.export.Dim("tokens", min=2, max=max_tokens)
    dynamic = {"image": {0: batch}, "ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}}
    with _export_mode():
        program = torch.onnx.export(
            graph,
            cases[0],
            input_names=list(INPUTS),
            output_names=graph.outputs,
            opset_version=OPSET,
            dynamo=True,
            optimize=optimize,
            dynamic_shapes=dynamic,
            verbose=False,
        )
    out = Path(out)
    worst = 0.0

    def write_checked(tmp: str) -> None:
        nonlocal worst
        program.save(tmp, external_data=False)
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        for case, references in zip(cases, expected):
            got = session.run(None, {name: t.numpy() for name, t in zip(INPUTS, case)})
            for output, reference in zip(got, references, strict=True):
                worst = max(worst, float(np.abs(output - reference).max()))
        if worst > TOLERANCE:
            raise LGFormerError(
                f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {TOLERANCE:g}); {out} not written"
            )

    atomic_write(out, write_checked)
    return worst
