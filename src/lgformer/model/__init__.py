"""The network of Fig. 3, one file per box, composed by injection:
`LGFormer(image_encoder, text_encoder, pixel_decoder, prototype_generator, head)`; `build_model(cfg)` makes
it from a `ModelConfig`. The public names below are imported on first use, so that the CLI's `--help`
(which imports `lgformer.model.commands`) does not load torch."""

from __future__ import annotations

from lgformer.lazy import lazy_exports

_EXPORTS = {
    "LGFormer": "lgformer.model.lgformer",
    "build_model": "lgformer.model.build",
    "MultiModalBackbone": "lgformer.model.backbone",
    "SwinTrunk": "lgformer.model.swin",
    "EfficientNetLite2": "lgformer.model.efficientnet",
    "TextEncoder": "lgformer.model.text_encoder",
    "PixelDecoder": "lgformer.model.pixel_decoder",
    "PrototypeGenerator": "lgformer.model.prototype_generator",
    "VLBA": "lgformer.model.fusion",
    "PWAM": "lgformer.model.fusion",
    "MaskHead": "lgformer.model.head",
    "mask_loss": "lgformer.model.loss",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
