"""What every box of the network shares: the input normalisation the trunks expect, the activations by
name, two caches (tensors kept while their sources are unchanged, tables that depend only on sizes) and
whether the model is being traced."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache, wraps
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

# ImageNet mean and std of RGB in [0, 1]: the Swin trunks' and, through its stem's affine, EfficientNet-Lite's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}

T = TypeVar("T")


def tracing() -> bool:
    """Whether `torch.compile` or `torch.jit.trace` is recording the model (fast paths keep plain ops)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def kept_while_unchanged(
    holder: object, attr: str, sources: tuple[Tensor, ...], build: Callable[[], T], extra: tuple = ()
) -> T:
    """`build()`, kept on `holder` as `attr` = (key, value) while every tensor of `sources` keeps its storage
    and version and `extra` (any other inputs of `build`) stays equal: in-place updates (optimiser steps,
    `load_state_dict`) and moves invalidate it. One entry: a new key replaces the old one.

    Tensors made under `torch.inference_mode` have no version counter, so in-place updates to them cannot
    be seen: for those nothing is kept and every call builds (a model made there runs, only slower).
    """
    if any(t.is_inference() for t in sources):
        return build()
    key = (*((t.data_ptr(), t._version) for t in sources), *extra)
    cached = getattr(holder, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, build())
        setattr(holder, attr, cached)
    return cached[1]


def size_cache(maxsize: int = 64) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """LRU cache for tensors that depend only on sizes (masks, orders, position tables).

    The body always runs outside inference mode and without autograd, so a table first built during an
    `inference_mode` validation can still be saved for backward by a later training step; while tracing
    nothing is cached.
    """

    def decorate(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @lru_cache(maxsize=maxsize)
        def cached(*args):
            with torch.inference_mode(False), torch.no_grad():
                return fn(*args)

        @wraps(fn)
        def call(*args):
            # While tracing (export, compile) build afresh: a traced tensor must not enter the cache.
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        call.cache_clear = cached.cache_clear
        return call

    return decorate
