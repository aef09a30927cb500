"""Build an LGFormer from a `ModelConfig`: every variant's hyper-parameters live in the config/presets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from lgformer.config import ModelConfig
from lgformer.errors import LGFormerError
from lgformer.model.backbone import MultiModalBackbone
from lgformer.model.fusion import FUSIONS
from lgformer.model.head import MaskHead
from lgformer.model.lgformer import LGFormer
from lgformer.model.pixel_decoder import PixelDecoder
from lgformer.model.prototype_generator import PrototypeGenerator
from lgformer.model.swin import SWIN_VARIANTS, SwinTrunk, load_swin_pretrained
from lgformer.model.target_head import TARGET_INPUTS, TargetHead
from lgformer.model.text_encoder import TextEncoder

LITE_BACKBONE = "efficientnet-lite2"
CHOICES = {
    "backbone": [*SWIN_VARIANTS, LITE_BACKBONE],
    "fusion": list(FUSIONS),
    "gate_init": ["trunc_normal", "zeros"],
    "l2va_keys": ["word", "sentence"],
    "query": ["linguistic", "learnable"],
    "loss_resolution": ["input", "quarter"],
    "no_target_input": list(TARGET_INPUTS),
}


def validate(cfg: ModelConfig) -> None:
    """Reject values no builder understands, naming the field and the valid choices."""
    for name, valid in CHOICES.items():
        if getattr(cfg, name) not in valid:
            raise LGFormerError(f"model.{name}={getattr(cfg, name)!r}; valid: {', '.join(valid)}")
    if len(cfg.fusion_heads) != 4 or min(cfg.fusion_heads) < 1:
        raise LGFormerError(f"model.fusion_heads needs 4 entries >= 1 (one a stage), got {cfg.fusion_heads}")
    for name in ("decoder_heads", "generator_heads"):
        heads = getattr(cfg, name)
        if heads < 1 or cfg.decoder_dim % heads:
            raise LGFormerError(f"model.{name}={heads}; it must divide model.decoder_dim={cfg.decoder_dim}")
    for name in ("drop_path", "text_dropout"):
        rate = getattr(cfg, name)
        if rate is not None and not 0 <= rate < 1:
            raise LGFormerError(f"model.{name}={rate}; it must be in [0, 1)")
    if not 0 <= cfg.encoder_fp32_stages <= 4:
        raise LGFormerError(f"model.encoder_fp32_stages={cfg.encoder_fp32_stages}; valid: 0 to 4")
    if cfg.no_target_weight < 0:
        raise LGFormerError(f"model.no_target_weight={cfg.no_target_weight}; it must be >= 0")
    if cfg.query == "learnable" and cfg.num_queries < 1:
        raise LGFormerError("model.num_queries must be >= 1 for learnable queries")


def build_trunk(cfg: ModelConfig, pretrained: bool) -> nn.Module:
    if cfg.backbone == LITE_BACKBONE:
        from lgformer.model.efficientnet import EfficientNetLite2

        if pretrained and cfg.backbone_weights:
            path = None if cfg.backbone_weights == "package" else cfg.backbone_weights
            return EfficientNetLite2.pretrained(path)
        return EfficientNetLite2()
    embed_dim, depths, heads = SWIN_VARIANTS[cfg.backbone]
    trunk = SwinTrunk(embed_dim, depths, heads, cfg.window, cfg.drop_path)
    if pretrained and cfg.backbone_weights:
        load_swin_pretrained(trunk, cfg.backbone_weights)
    return trunk


INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
)


def _as_allocated(tensor: Tensor, *args: object, **kwargs: object) -> Tensor:
    return tensor


@contextlib.contextmanager
def initialisers_off() -> Iterator[None]:
    """`torch.nn.init`'s initialisers leave tensors as allocated while inside, for a model whose every
    parameter is loaded next: drawing random weights is most of the time of building one. Process-wide
    while it lasts, as transformers' `no_init_weights`."""
    saved = {name: getattr(nn.init, name) for name in INITIALISERS}
    for name in INITIALISERS:
        setattr(nn.init, name, _as_allocated)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(cfg: ModelConfig, pretrained: bool = True, init: bool = True) -> LGFormer:
    """`pretrained` loads the backbone file named in the config and the text encoder's weights;
    without it every weight is freshly initialised (for converted checkpoints, tests and timing).
    `init=False` leaves the parameters as allocated, for a caller that loads every one of them next."""
    validate(cfg)
    if not init:
        with initialisers_off():
            return build_model(cfg, pretrained)
    trunk = build_trunk(cfg, pretrained)
    text_encoder = TextEncoder.build(cfg.text_encoder, pretrained=pretrained, dropout=cfg.text_dropout)
    text_dim = text_encoder.dim
    for stage, (width, heads) in enumerate(zip(trunk.channels, cfg.fusion_heads)):
        if width % heads or text_dim % heads:
            raise LGFormerError(
                f"model.fusion_heads[{stage}]={heads}; it must divide the stage's width {width} and the text "
                f"width {text_dim}"
            )
    image_encoder = MultiModalBackbone(
        trunk, text_dim, cfg.fusion, cfg.fusion_heads, fp32_stages=cfg.encoder_fp32_stages
    )
    if cfg.gate_init == "zeros":
        for gate in [*image_encoder.vis_gates, *(image_encoder.text_gates or [])]:
            for p in gate.parameters():
                nn.init.zeros_(p)
    pixel_decoder = PixelDecoder(
        trunk.channels,
        text_dim,
        dim=cfg.decoder_dim,
        heads=cfg.decoder_heads,
        layers=cfg.decoder_layers,
        points=cfg.decoder_points,
        ffn=cfg.decoder_ffn,
        l2va=cfg.l2va,
        l2va_keys=cfg.l2va_keys,
        l2va_ffn=cfg.l2va_ffn,
        max_tokens=cfg.max_tokens,
        fp32=cfg.decoder_fp32,
    )
    generator = PrototypeGenerator(
        text_dim,
        cfg.decoder_dim,
        heads=cfg.generator_heads,
        layers=cfg.generator_layers if cfg.v2la else 0,
        ffn=cfg.generator_ffn,
        query=cfg.query,
        num_queries=cfg.num_queries,
    )
    merge = generator.num_queries if cfg.query == "learnable" else 0
    head = MaskHead(text_dim, cfg.decoder_dim, bias=cfg.head_bias, merge_queries=merge)
    target_head = TargetHead(text_dim, cfg.decoder_dim, cfg.no_target_input) if cfg.no_target_head else None
    return LGFormer(image_encoder, text_encoder, pixel_decoder, generator, head, target_head)
