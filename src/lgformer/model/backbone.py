"""Multi-modal image encoder (Fig. 3, left): a trunk with a fusion module after each of its 4 stages.

The trunk (Swin or EfficientNet-Lite2) exposes `stages` (each (B,C,H,W) -> (B,C',H',W')) and
`channels`. After stage i the fusion gives (V_m, L_m); the gated sums update both streams
(docs/architecture.md#multi-modal-image-encoder):  X' = X + g(V_m) * V_m,  L' = (L + h(L_m) * L_m) * m.  The
decoder receives LN(V_m) (the
fusion *response*) and the last stage's L_m; the next stage consumes X'.

Under autocast, the first `fp32_stages` stages (trunk stage, fusion, gates, output norm) can run in fp32:
the 1/4-scale response F_1 reaches the mask features through the decoder's lateral connection, so its bf16
rounding moves mask boundaries directly (README, "Speed": bf16 agreement).
"""

from __future__ import annotations

import torch
from torch import nn

from lgformer.model.fusion import FUSIONS, Gate
from lgformer.model.layers import LayerNorm


class MultiModalBackbone(nn.Module):
    """forward(image (B,3,H,W), words (B,T,D), mask (B,T)) -> ([F_1..F_4] (B,C_i,H_i,W_i), T_dec (B,T,D))."""

    def __init__(
        self,
        trunk: nn.Module,
        text_dim: int,
        fusion: str = "vlba",
        fusion_heads: list[int] | None = None,
        fp32_stages: int = 0,
    ) -> None:
        super().__init__()
        self.fp32_stages = fp32_stages
        channels: list[int] = list(trunk.channels)
        heads = fusion_heads or [1] * len(channels)
        self.trunk = trunk
        self.channels = channels
        self.bidirectional = fusion == "vlba"
        self.fusions = nn.ModuleList(FUSIONS[fusion](c, text_dim, h) for c, h in zip(channels, heads))
        self.vis_gates = nn.ModuleList(Gate(c) for c in channels)
        self.text_gates = nn.ModuleList(Gate(text_dim) for _ in channels) if self.bidirectional else None
        self.out_norms = nn.ModuleList(LayerNorm(c) for c in channels)
        # After the last stage nothing consumes X' or L': its gates exist (the authors' checkpoints carry
        # them) but can never receive a gradient, so they are frozen and not evaluated.
        for gates in (self.vis_gates, self.text_gates):
            if gates is not None:
                gates[-1].requires_grad_(False)

    def forward(
        self, image: torch.Tensor, words: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        m = mask.to(words.dtype)
        lang = words * m.unsqueeze(-1)
        text_dec = lang
        x = image
        feats = []
        device = image.device.type
        for i in range(len(self.trunk.stages)):
            if i < self.fp32_stages and torch.is_autocast_enabled(device):
                with torch.autocast(device, enabled=False):
                    x, lang, feat, l_m = self._stage(i, x.float(), lang.float(), m.float())
            else:
                x, lang, feat, l_m = self._stage(i, x, lang, m)
            feats.append(feat)
            if l_m is not None:
                text_dec = l_m
        return feats, text_dec

    def _stage(
        self, i: int, x: torch.Tensor, lang: torch.Tensor, m: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage i and its fusion: (X, L) -> (X', L', F_i, L_m); the last stage returns X and L unchanged."""
        x = self.trunk.stages[i](x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C); a view when x is channels-last
        v_m, l_m = self.fusions[i](tokens, lang, m)
        feat = self.out_norms[i](v_m).transpose(1, 2).view(b, c, h, w)
        if i == len(self.trunk.stages) - 1:
            return x, lang, feat, l_m
        tokens = tokens + self.vis_gates[i](v_m) * v_m
        if l_m is not None:
            lang = (lang + self.text_gates[i](l_m) * l_m) * m.unsqueeze(-1)
        return tokens.transpose(1, 2).view(b, c, h, w), lang, feat, l_m
