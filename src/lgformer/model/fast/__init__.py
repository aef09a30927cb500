"""The CPU fast paths, behind one switch.

Every model file computes the paper's plain formulation; where a CPU can take a faster route to the same
numbers (up to summation order, and under bf16 autocast up to where bf16 rounds), the file asks
`enabled(path)` before taking it. All paths are on by default; `disabled()` turns all (or the named ones)
off for a block, e.g. to compare a fast path with its plain form in a test, to export to ONNX, or to time
what each one is worth (`benchmarks/speed_ablation.py`).
The switch is per process, not per thread.

    from lgformer.model import fast
    with fast.disabled():                 # the plain formulation throughout
        plain = model(image, mask, ids=ids)
    with fast.disabled("winograd"):       # everything but one path
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lgformer.errors import LGFormerError

PATHS = {
    "onednn": "fp32 products and 1x1 convolutions through oneDNN, in training on CPUs other than Intel's "
    "(plain: F.linear, conv2d)",
    "bf16-onednn": "bf16 autocast products through oneDNN, activations fused (plain: autocast's F.linear)",
    "prepack": "weights cast and blocked for oneDNN once, kept while unchanged (plain: on every call)",
    "fused-act": "ReLU / GELU / tanh fused into the oneDNN product (plain: applied after it)",
    "bert-onednn": "the text encoder's products through oneDNN (plain: F.linear)",
    "channels-last": "the EfficientNet-Lite2 trunk in channels-last memory (plain: NCHW)",
    "native-sampler": "deformable sampling forward and backward by a C kernel built on first use with the "
    "system's compiler, a head's channels at a time (plain: the bag-sampler path, or grid_sample)",
    "native-groupnorm": "in CPU bf16 training, the pixel decoder's GroupNorm backward on channels-last maps "
    "by a C kernel built on first use (plain: PyTorch's, several times slower there)",
    "native-layernorm": "in CPU bf16 training, LayerNorm's backward by a C kernel built on first use, its "
    "sums in fp32 (plain: PyTorch's, slower there and summing the weight gradients in bf16)",
    "native-dw": "EfficientNet-Lite2's stride-2 depthwise convolutions, forward and backward, by a C kernel "
    "built on first use, the SAME padding implicit (plain: the map padded, then oneDNN)",
    "bf16-weights": "in CPU bf16 training, the weights autocast only casts to bf16 kept in bf16 between "
    "steps, their gradients left in bf16 and folded into AdamW's update by a C kernel built on first use "
    "(plain: every weight cast to bf16 each step and its gradient cast back to fp32)",
    "bag-sampler": "deformable sampling as one weighted embedding_bag (plain: grid_sample per level)",
    "bag-backward": "the embedding_bag sampler's own backward (plain: autograd through embedding_bag)",
    "short-softmax": "the deformable attention's softmax over its 12 (level, point) logits taken along the "
    "long axis of the transposed scores (plain: softmax(-1))",
    "window-order": "Swin windows gathered in one index pass, only real tokens projected, windows of one "
    "pattern batched (plain: pad, roll, partition, attend, reverse)",
    "window-explicit": "Swin window attention written out in CPU inference, and in CPU bf16 training with "
    "its products in bf16 (plain: the fused SDPA kernel, which trains a bias in fp32 math)",
    "attn-fold": "cross-attention of few queries folds the key projection into the query (plain: keys "
    "projected)",
    "xattn-fold": "cross-attention over few keys folds the query and output projections into the keys "
    "(plain: queries projected, fused kernel)",
    "xattn-explicit": "in CPU bf16 training, cross-attention over few keys written out (plain: the fused "
    "kernel, whose bf16 backward is slow over few keys)",
    "vlba-fold": "VLBA's language branch folds sym_value into its instance norm (plain: sym_value on every "
    "token, then the norm)",
    "bn-fold": "EfficientNet-Lite2's eval-mode BatchNorms folded into their convolutions, in inference and "
    "in training with frozen statistics (plain: BN after the conv)",
    "dw-weight-grad": "in CPU training, EfficientNet-Lite2's 5x5 depthwise weight gradients as one "
    "depthwise convolution of the input by the output gradient (plain: oneDNN's depthwise backward)",
    "dw-strided-grad": "in CPU bf16 training, the input gradients of EfficientNet-Lite2's stride-2 depthwise "
    "convolutions in fp32 (plain: oneDNN's bf16 depthwise backward, several times slower there)",
    "winograd": "the pixel decoder's 3x3 output convolution as Winograd F(4x4, 3x3) (plain: conv2d)",
}

_off: set[str] = set()


def _check(paths: tuple[str, ...]) -> None:
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise LGFormerError(f"unknown fast path {unknown[0]!r}; valid: {', '.join(PATHS)}")


def enabled(path: str) -> bool:
    """Whether the model takes fast path `path` where it applies."""
    return path not in _off


def set_enabled(path: str, on: bool) -> None:
    """Switch one path on or off for the rest of the process."""
    _check((path,))
    (_off.discard if on else _off.add)(path)


@contextlib.contextmanager
def disabled(*paths: str) -> Iterator[None]:
    """The named paths (all when none is named) off inside the block; the previous state after it."""
    _check(paths)
    before = set(_off)
    _off.update(paths or PATHS)
    try:
        yield
    finally:
        _off.clear()
        _off.update(before)
