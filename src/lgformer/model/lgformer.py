"""The assembled network (Fig. 3), composed by injection like SAM's `Sam(...)`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lgformer.model.backbone import MultiModalBackbone
from lgformer.model.fast.onednn import drop_packed_weights
from lgformer.model.head import MaskHead
from lgformer.model.pixel_decoder import PixelDecoder
from lgformer.model.prototype_generator import PrototypeGenerator
from lgformer.model.target_head import TargetHead
from lgformer.model.text_encoder import TextEncoder


class LGFormer(nn.Module):
    """Image + expression -> mask logits.

    forward(image (B,3,H,W), text_mask (B,T), ids (B,T) | text_features (B,T,D)) -> logits (B, n, H, W):
    one map per prototype (n = 7 for the paper's model: the sentence query, then each generator layer);
    channel -1 is the prediction, `logits > 0` the mask. With `upsample=False` the maps stay at 1/4 scale
    (what the loss consumes); with `all_outputs=False` only the prediction is made (n = 1): the other maps
    serve the deep supervision of training. The image is cast to the parameters' dtype (`dtype`): float32
    under autocast, or what `.half()`, `.bfloat16()`, `.double()` made them.

    With a `target_head` (generalized referring segmentation, not in the paper), `with_target=True` returns
    `(logits, target_logits (B,))`: "does anything match?" (sigmoid > 0.5), None without the head.
    """

    def __init__(
        self,
        image_encoder: MultiModalBackbone,
        text_encoder: TextEncoder,
        pixel_decoder: PixelDecoder,
        prototype_generator: PrototypeGenerator,
        head: MaskHead,
        target_head: TargetHead | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.pixel_decoder = pixel_decoder
        self.prototype_generator = prototype_generator
        self.head = head
        self.target_head = target_head
        # an empty tensor that follows the model's conversions (.double(), .half()): its dtype is the model's,
        # which a product's weight cannot tell (bf16 inside a `Bf16WeightsAdamW` training step)
        self.register_buffer("dtype_of_parameters", torch.empty(0), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LGFormer:
        # .to() / .cuda() / .half() replace the parameters' data: the packed weights would be stale memory
        drop_packed_weights(self)
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_of_parameters.dtype

    def forward(
        self,
        image: torch.Tensor,
        text_mask: torch.Tensor,
        ids: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
        upsample: bool = True,
        all_outputs: bool = True,
        with_target: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if text_features is None:
            if ids is None:
                raise ValueError("pass token `ids` or precomputed `text_features`")
            text_features = self.text_encoder(ids, text_mask)
        feats, words = self.image_encoder(image.to(self.dtype), text_features, text_mask)
        mask_features, ms_feats = self.pixel_decoder(feats, words, text_mask)
        queries = self.prototype_generator(words, text_mask, ms_feats)
        logits = self.head(queries if all_outputs else queries[-1:], mask_features)
        target = None
        if with_target and self.target_head is not None:
            target = self.target_head(queries[-1], mask_features, logits[:, -1])
        if upsample:
            logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return (logits, target) if with_target else logits
