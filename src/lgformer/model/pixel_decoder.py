"""Language-guided pixel decoder (Fig. 3, "Pixel decoder"; docs/architecture.md#pixel-decoder).

The 1/32, 1/16, 1/8 maps are projected to `dim`, flattened coarse-to-fine and refined by N layers of
multi-scale deformable self-attention + FFN, then (L2VA) cross-attention from pixels to words + FFN.
One FPN step with the 1/4 map gives the mask features. Runs in fp32 even under autocast, as the
authors do; `fp32=False` lets its products follow the caller's autocast instead, while sampling offsets,
attention weights, softmax and bilinear sampling stay fp32 (faster, at the cost of the authors' numerics:
README, "Speed").
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from lgformer.model.attention import CrossAttentionLayer
from lgformer.model.common import size_cache
from lgformer.model.deformable_attention import MSDeformAttn
from lgformer.model.layers import (
    Conv1x1,
    Conv3x3,
    GroupNorm,
    LayerNorm,
    Linear,
    linear,
    masked_mean,
    sine_position_embedding,
)

LEVELS = 3


class DeformableLayer(nn.Module):
    """src <- LN(src + MSDA(src + pos, src)); src <- LN(src + FFN(src)). (B, S, dim) -> (B, S, dim)."""

    def __init__(self, dim: int, heads: int, points: int, ffn: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, LEVELS, heads, points)
        self.norm1 = LayerNorm(dim)
        self.linear1 = Linear(dim, ffn)
        self.linear2 = Linear(ffn, dim)
        self.norm2 = LayerNorm(dim)

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, ref, src, shapes))
        return self.norm2(src + self.linear2(linear(src, self.linear1.weight, self.linear1.bias, "relu")))


@size_cache(32)
def _reference_points(shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
    return torch.cat(points)[None]  # (1, S, 2) normalised (x, y) pixel centres


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


def _group_norm(dim: int) -> GroupNorm:
    return GroupNorm(32, dim)


class PixelDecoder(nn.Module):
    """forward(feats [F_1..F_4], words (B,T,D), mask (B,T)) -> (mask features (B,dim,H_1,W_1),
    [M_32, M_16, M_8]); the maps are channels-last (NCHW views of (B, H, W, C) memory)."""

    def __init__(
        self,
        in_channels: list[int],
        text_dim: int,
        dim: int = 256,
        heads: int = 8,
        layers: int = 6,
        points: int = 4,
        ffn: int = 1024,
        l2va: bool = True,
        l2va_keys: str = "word",
        l2va_ffn: int = 2048,
        max_tokens: int = 20,
        fp32: bool = True,
    ) -> None:
        super().__init__()
        self.fp32 = fp32
        self.dim = dim
        self.l2va_keys = l2va_keys
        # Level l reads F_{4-l}: coarse to fine (level 0 is 1/32).
        self.input_proj = nn.ModuleList(
            nn.Sequential(Conv1x1(in_channels[3 - lvl], dim), _group_norm(dim)) for lvl in range(LEVELS)
        )
        self.level_embed = nn.Parameter(torch.randn(LEVELS, dim))
        # Deep copies of one layer, as the authors build them: the 1-D biases start identical.
        self.layers = _clones(DeformableLayer(dim, heads, points, ffn), layers)
        self.cross_layers = (
            _clones(CrossAttentionLayer(dim, text_dim, heads, l2va_ffn), layers) if l2va else None
        )
        self.key_embed = nn.Embedding(max_tokens, text_dim) if l2va and l2va_keys == "word" else None
        self.lateral = nn.Sequential(Conv1x1(in_channels[0], dim, bias=False), _group_norm(dim))
        self.output_conv = nn.Sequential(Conv3x3(dim, dim), _group_norm(dim), nn.ReLU())
        self.mask_features = Conv1x1(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init (docs/architecture.md#initialisation): xavier on projections and transformer
        weights, MSDA reset."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for module in (self.layers, self.cross_layers, self.key_embed):
            if module is None:
                continue
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for layer in self.cross_layers or []:
            nn.init.zeros_(layer.cross_attn.in_proj_bias)
            nn.init.zeros_(layer.cross_attn.out_proj.bias)
        nn.init.normal_(self.level_embed)
        for layer in self.layers:
            layer.self_attn.reset_parameters()
        for conv in (self.lateral[0], self.output_conv[0], self.mask_features):
            nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)

    def forward(
        self, feats: list[torch.Tensor], words: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.fp32:
            return self._forward(feats, words, mask)
        dtype = self.level_embed.dtype  # float32, unless the model was converted (.double(), .half())
        with torch.autocast(feats[0].device.type, enabled=False):
            return self._forward([f.to(dtype) for f in feats], words.to(dtype), mask)

    def _forward(
        self, feats: list[torch.Tensor], words: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = [proj(feats[3 - lvl]) for lvl, proj in enumerate(self.input_proj)]
        shapes = [(m.shape[2], m.shape[3]) for m in maps]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, S, dim)
        pos = torch.cat(
            [
                sine_position_embedding(h, w, self.dim, src.device).to(self.level_embed.dtype)
                + self.level_embed[lvl]
                for lvl, (h, w) in enumerate(shapes)
            ]
        )[None]
        ref = _reference_points(tuple(shapes), src.device)
        if self.cross_layers is not None:
            if self.key_embed is not None:  # words as keys, with a learned position per token
                values, padding = words, mask == 0
                keys = words + self.key_embed.weight[: words.shape[1]]
            else:  # Table 6 variant: the pooled sentence is the only key
                values, padding = masked_mean(words, mask), None
                keys = values
        for n, layer in enumerate(self.layers):
            src = layer(src, pos, ref, shapes)
            if self.cross_layers is not None:
                src = self.cross_layers[n](src, pos, keys, values, padding)
        b = src.shape[0]
        # NCHW views of (B, H, W, dim) memory, batch stride included: at batch 1 a transpose + reshape gets
        # an arbitrary batch stride, which sends `interpolate` below down its slow NCHW path plus a copy
        ms_feats = [
            level.view(b, h, w, self.dim).permute(0, 3, 1, 2)
            for level, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        lateral = self.lateral(feats[0])
        y = lateral + F.interpolate(
            ms_feats[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.mask_features(self.output_conv(y)), ms_feats
