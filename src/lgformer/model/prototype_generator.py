"""Linguistic prototype generator (Fig. 3, "V2LA"; docs/architecture.md#prototype-generator).

The query is the pooled sentence (masked mean of the decoder words, projected). Each layer lets it
attend to one level of the pixel decoder's output, round-robin 1/32, 1/16, 1/8: post-norm
cross-attention then FFN, no self-attention. Every intermediate query is a prototype (deep
supervision). The Table 2 baseline replaces the sentence query by K learnable queries.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lgformer.model.attention import CrossAttentionLayer
from lgformer.model.layers import Linear, masked_mean, sine_position_embedding


class PrototypeGenerator(nn.Module):
    """forward(words (B,T,D), mask (B,T), ms_feats [(B,C,h,w)] coarse->fine) -> [q_0..q_L] each (B,K,D)."""

    def __init__(
        self,
        text_dim: int,
        feat_dim: int,
        heads: int = 8,
        layers: int = 6,
        ffn: int = 2048,
        query: str = "linguistic",
        num_queries: int = 1,
        levels: int = 3,
    ) -> None:
        super().__init__()
        self.feat_dim = feat_dim
        self.levels = levels
        self.num_queries = num_queries if query == "learnable" else 1
        if query == "linguistic":
            self.txt_proj = Linear(text_dim, text_dim)
        else:
            self.query_feat = nn.Embedding(self.num_queries, text_dim)
        if layers:
            self.query_embed = nn.Embedding(self.num_queries, text_dim)
            self.level_embed = nn.Embedding(levels, feat_dim)
            layer = CrossAttentionLayer(text_dim, feat_dim, heads, ffn)
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            nn.init.zeros_(layer.cross_attn.in_proj_bias)
            nn.init.zeros_(layer.cross_attn.out_proj.bias)
            # The authors deep-copy one initialised layer: all layers start identical.
            self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))
        else:
            self.layers = nn.ModuleList()

    def forward(
        self, words: torch.Tensor, mask: torch.Tensor, ms_feats: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if hasattr(self, "txt_proj"):
            q = self.txt_proj(masked_mean(words, mask))
        else:
            q = self.query_feat.weight[None].expand(words.shape[0], -1, -1)
        queries = [q]
        if not len(self.layers):
            return queries
        keys, values = [], []
        for lvl, feat in enumerate(ms_feats):
            h, w = feat.shape[-2:]
            value = feat.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl]
            values.append(value)
            keys.append(value + sine_position_embedding(h, w, self.feat_dim, feat.device).to(value.dtype))
        for n, layer in enumerate(self.layers):
            lvl = n % self.levels
            q = layer(q, self.query_embed.weight[None], keys[lvl], values[lvl])
            queries.append(q)
        return queries
