"""LGFormer: linguistic query-guided mask generation for referring image segmentation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__"]

if TYPE_CHECKING:
    from lgformer.predictor import Segmenter


def __getattr__(name: str) -> Any:
    """`lgformer.Segmenter`, imported on first use so that `import lgformer` does not load torch."""
    if name == "Segmenter":
        from lgformer.predictor import Segmenter

        return Segmenter
    raise AttributeError(f"module 'lgformer' has no attribute {name!r}")
