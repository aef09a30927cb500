"""Vision-language fusion after each backbone stage (Fig. 3, "VLBA").

`VLBA` is the paper's bidirectional module (docs/architecture.md#vlba-fusion): one shared pixel-word affinity
drives both a
word-to-pixel response (updating the visual stream) and a pixel-to-word response (updating the
language stream). `PWAM` is LAVT's one-way pixel-word attention, the paper's Table 4 baseline.
Both take tokens `x` (B, N, C), words `l` (B, T, D) and a float mask `m` (B, T) with 1 for real words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lgformer.model import fast
from lgformer.model.fast.attention import folded_attend_normalised
from lgformer.model.layers import Linear, linear

IN_EPS = 1e-5


def instance_norm_tokens(x: torch.Tensor) -> torch.Tensor:
    """Instance norm over the token axis of (B, N, C): per sample and channel, biased variance, no affine.

    PyTorch's instance norm on the (B, C, N) view, as the authors' `nn.InstanceNorm1d`. Not batch norm on
    the (N, B·C) view: its channels-last statistics lose precision when the tokens' mean is large against
    their spread, which the VLBA norms see (1e-3 relative on the training golden's first fusion, 40x the
    authors' rounding), and its backward is slower. A single token normalises to 0 (the kernel refuses
    one value per channel).
    """
    if x.shape[1] == 1:
        return torch.zeros_like(x)
    return F.instance_norm(x.transpose(1, 2), eps=IN_EPS).transpose(1, 2)


def attend_normalised(p: torch.Tensor, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """P_h · IN_N(layer(x))_h for each head h of P: p (B, heads, T, N) with rows summing to 1, x (B, N, C),
    layer C -> D -> (B, T, D). With many narrow tokens the `vlba-fold` fast path takes an equal form that
    never applies `layer` to every token (`model/fast/attention.py`,
    docs/architecture.md#instance-norm-conditioning)."""
    n, c = x.shape[1:]
    d = layer.weight.shape[0]
    if fast.enabled("vlba-fold") and 4 * c * (n + d) < n * d:
        return folded_attend_normalised(p, x, layer.weight, IN_EPS)
    return _merge_heads(torch.matmul(p, _split_heads(instance_norm_tokens(layer(x)), p.shape[1])))


def _linear(layer: nn.Linear, x: torch.Tensor, activation: str) -> torch.Tensor:
    """activation(layer(x)), fused into the product where `linear` can."""
    return linear(x, layer.weight, layer.bias, activation)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, C) -> (B, heads, L, C/heads), contiguous channel groups per head."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, c) -> (B, L, heads*c)."""
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class PixelWordAttention(nn.Module):
    """Word-to-pixel attention shared by VLBA and PWAM: Q = IN(Wq x), K = Wk l, V = Wv l (masked).

    Returns the pixel response IN(W (softmax(A) V)) (B, N, C) and the logits A (B, heads, N, T).
    The logits are scaled by the full C^-1/2 and padded words get -10000 (not -inf), as the authors do.
    """

    def __init__(self, dim: int, text_dim: int, heads: int = 1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.scale = dim**-0.5
        self.query = Linear(dim, dim)
        self.key = Linear(text_dim, dim)
        self.value = Linear(text_dim, dim)
        self.W = Linear(dim, dim)

    def forward(self, x: torch.Tensor, l: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mm = m.unsqueeze(-1)
        q = _split_heads(instance_norm_tokens(self.query(x)), self.heads)
        k = _split_heads(self.key(l) * mm, self.heads)
        v = _split_heads(self.value(l) * mm, self.heads)
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale + (1e4 * m - 1e4)[:, None, None, :]
        response = _merge_heads(torch.matmul(logits.softmax(dim=-1), v))
        return instance_norm_tokens(self.W(response)), logits


class VLBA(nn.Module):
    """Vision-language bidirectional attention (docs/architecture.md#vlba-fusion). Returns (V_m (B,N,C), L_m
    (B,T,D))."""

    def __init__(self, dim: int, text_dim: int, heads: int = 1) -> None:
        super().__init__()
        if text_dim % heads:
            raise ValueError(f"text width {text_dim} is not divisible by {heads} fusion heads")
        self.heads = heads
        self.vis_project = Linear(dim, dim)
        self.lang_project = Linear(text_dim, text_dim)
        self.attn = PixelWordAttention(dim, text_dim, heads)
        self.sym_value = Linear(dim, text_dim)
        # The instance norm after sym_value removes its bias, whose gradient is exactly zero;
        # `attend_normalised` may not read it at all, so it is frozen (the authors' checkpoints carry it).
        self.sym_value.bias.requires_grad_(False)
        self.sym_W = Linear(text_dim, text_dim)
        self.project_mm = nn.ModuleList([Linear(2 * dim, dim), Linear(dim, dim)])
        self.sym_project_mm = nn.ModuleList([Linear(2 * text_dim, text_dim), Linear(text_dim, text_dim)])

    def forward(self, x: torch.Tensor, l: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mm = m.unsqueeze(-1)
        vp = _linear(self.vis_project, x, "gelu")
        lp = _linear(self.lang_project, l, "gelu") * mm
        vr, logits = self.attn(x, l, m)
        # Language branch: the same logits, softmax over pixels (padded rows are constant along N).
        lr = attend_normalised(logits.transpose(-1, -2).softmax(dim=-1), x, self.sym_value) * mm
        lr = self.sym_W(lr) * mm
        v_m = _linear(
            self.project_mm[1], _linear(self.project_mm[0], torch.cat([vp, vr], dim=-1), "gelu"), "gelu"
        )
        l_m = _linear(self.sym_project_mm[0], torch.cat([lp, lr], dim=-1), "gelu")
        return v_m, _linear(self.sym_project_mm[1], l_m, "gelu") * mm


class PWAM(nn.Module):
    """LAVT's pixel-word attention module: V_m = proj(GELU(Wv x) * attn(x, l)); words are not updated."""

    def __init__(self, dim: int, text_dim: int, heads: int = 1) -> None:
        super().__init__()
        self.vis_project = Linear(dim, dim)
        self.attn = PixelWordAttention(dim, text_dim, heads)
        self.project_mm = Linear(dim, dim)

    def forward(self, x: torch.Tensor, l: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, None]:
        response, _ = self.attn(x, l, m)
        return _linear(self.project_mm, _linear(self.vis_project, x, "gelu") * response, "gelu"), None


class Gate(nn.Sequential):
    """tanh(W2 ReLU(W1 x)), no biases: the per-token, per-channel residual gate
    (docs/architecture.md#gates)."""

    def __init__(self, dim: int) -> None:
        super().__init__(Linear(dim, dim, bias=False), nn.ReLU(), Linear(dim, dim, bias=False), nn.Tanh())
        # The authors' constructor zeroes these, but their backbone-wide re-init then draws every Linear
        # from trunc-normal(0.02): that is the effective init (docs/architecture.md#initialisation);
        # `gate_init: zeros` restores zeros.
        for layer in (self[0], self[2]):
            nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self[0].weight, None, "relu"), self[2].weight, None, "tanh")


FUSIONS: dict[str, type[nn.Module]] = {"vlba": VLBA, "pwam": PWAM}
