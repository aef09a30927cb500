"""Swin Transformer trunk (Fig. 3, visual backbone without the fusion modules),
docs/architecture.md#multi-modal-image-encoder.

Each of the 4 stages maps an NCHW map to an NCHW map: stage 0 is the 4x4 patch embedding, stages
1..3 start with patch merging; then come the Swin blocks (even blocks W-MSA, odd blocks SW-MSA with
a shift of floor(w/2), always, even when the map fits one window). Internally everything is
channel-last (B, H, W, C); a stage returns a permuted NCHW *view* of that memory so the caller can
flatten it to tokens without copies.

Window attention adds one float mask to the logits: the gathered relative-position bias, plus the -100
shift mask in odd blocks. Padded tokens (zeros after LN1) are ordinary keys and values, as in the
authors' code. On a CPU the same attention is computed in window order, real tokens only, with cached
masks (`model/fast/windows.py`). The projections are `lgformer.model.layers.Linear`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.errors import LGFormerError
from lgformer.model import fast
from lgformer.model.common import size_cache
from lgformer.model.fast import windows
from lgformer.model.layers import LayerNorm, Linear, linear
from lgformer.safe_load import load_torch_file

# name -> (embed dim e, depths, heads per stage)
SWIN_VARIANTS: dict[str, tuple[int, list[int], list[int]]] = {
    "swin-t": (96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "swin-s": (96, [2, 2, 18, 2], [3, 6, 12, 24]),
    "swin-b": (128, [2, 2, 18, 2], [4, 8, 16, 32]),
    "swin-l": (192, [2, 2, 18, 2], [6, 12, 24, 48]),
}
PATCH = 4
MLP_RATIO = 4
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: int) -> Tensor:
    """(M, M) int64, M = w²: idx(a, b) = (ya - yb + w - 1)(2w - 1) + (xa - xb + w - 1)
    (docs/architecture.md#swin-trunk-blocks-and-window-attention)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


@size_cache()
def shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> Tensor:
    """(nW, M, M) float32: 0 where two tokens of a window share a region label, else -100.

    Labels r = 3·ry + rx come from the *unshifted* padded Hp x Wp grid
    (docs/architecture.md#swin-trunk-blocks-and-window-attention). Cached; never
    modify the result in place.
    """

    def bands(n: int) -> Tensor:
        r = torch.zeros(n, dtype=torch.long, device=device)
        r[n - window :] = 1
        r[n - shift :] = 2
        return r

    labels = 3 * bands(hp)[:, None] + bands(wp)[None, :]
    labels = labels.view(hp // window, window, wp // window, window).transpose(1, 2).reshape(-1, window**2)
    same = labels[:, :, None] == labels[:, None, :]
    return torch.where(same, 0.0, SHIFT_MASK_VALUE).to(torch.float32)


class DropPath(nn.Module):
    """Stochastic depth: zero whole samples with probability p and rescale by 1/(1-p); identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), e) channel-last: pad right/bottom, Conv 4x4/4, LN
    (docs/architecture.md#swin-trunk-patch-embedding)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=PATCH, stride=PATCH)
        self.norm = LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = -x.shape[2] % PATCH, -x.shape[3] % PATCH
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C) channel-last
    (docs/architecture.md#swin-trunk-patch-merging).

    Zero-pad odd H/W (before the LN), concatenate the sub-grids (0,0), (1,0), (0,1), (1,1)
    (row offset first), LN(4C), Linear(4C -> 2C, no bias).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with relative-position bias
    (docs/architecture.md#swin-trunk-blocks-and-window-attention)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self._mask_cache: tuple[tuple, list[Tensor]] | None = None

    def attention_mask(self, hp: int, wp: int, shift: int) -> Tensor:
        """The float mask every window adds to its logits on an Hp x Wp grid: the relative-position bias
        (1, heads, M, M), plus the -100 shift mask of each window (windows, heads, M, M) when shifted."""
        m = self.window * self.window
        table = self.relative_position_bias_table
        mask = table[self.relative_position_index.view(-1)].view(m, m, self.heads).permute(2, 0, 1)
        mask = mask.contiguous().unsqueeze(0)
        if shift:
            mask = mask + shift_mask(hp, wp, self.window, shift, table.device).unsqueeze(1)
        return mask

    def forward(self, x: Tensor, shift: int) -> Tensor:
        """x: (B, H, W, C) normalised tokens -> (B, H, W, C): pad to Hp x Wp, roll by -shift, cut into
        w x w windows, attend inside each with the relative-position bias (plus the shift mask), stitch,
        roll back, crop. On a CPU the `window-order` fast path computes the same (`model/fast/windows.py`)."""
        if fast.enabled("window-order"):
            return windows.attend(self, x, shift)
        b, hh, ww, c = x.shape
        win, heads, m = self.window, self.heads, self.window * self.window
        x = F.pad(x, (0, 0, 0, -ww % win, 0, -hh % win))
        hp, wp = x.shape[1:3]
        x = torch.roll(x, (-shift, -shift), (1, 2))
        tiles = x.view(b, hp // win, win, wp // win, win, c).transpose(2, 3).reshape(b, -1, m, c)
        q, k, v = self.qkv(tiles).unflatten(-1, (3, heads, c // heads)).permute(3, 0, 1, 4, 2, 5)
        mask = self.attention_mask(hp, wp, shift).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n, heads, M, d)
        out = self.proj(out.transpose(2, 3).reshape(b, -1, m, c))
        out = out.view(b, hp // win, wp // win, win, win, c).transpose(2, 3).reshape(b, hp, wp, c)
        return torch.roll(out, (shift, shift), (1, 2))[:, :hh, :ww]


class Mlp(nn.Module):
    """Linear(C -> 4C) -> exact GELU -> Linear(4C -> C); the GELU is fused into the first product."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(linear(x, self.fc1.weight, self.fc1.bias, "gelu"))


class SwinBlock(nn.Module):
    """(B, H, W, C) -> (B, H, W, C): LN1, pad, [roll -s], windows, attention, [roll +s], crop; MLP.

    The padding, roll and window partition are one `index_select` (and likewise their inverse with the
    crop), inside `WindowAttention`.
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.shift = shift
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), self.shift))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinStage(nn.Module):
    """(B, C_in, H, W) -> (B, C, H', W'): downsample (patch embed or merging), then the Swin blocks.

    The output is an NCHW view of channel-last memory; inputs of any strides are accepted.
    """

    def __init__(
        self, dim: int, depth: int, heads: int, window: int, drop_paths: list[float], first: bool
    ) -> None:
        super().__init__()
        self.first = first
        self.downsample = PatchEmbed(3, dim) if first else PatchMerging(dim // 2)
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, window // 2 if j % 2 else 0, drop_paths[j]) for j in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x if self.first else x.permute(0, 2, 3, 1))
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)


class SwinTrunk(nn.Module):
    """Four Swin stages of widths [e, 2e, 4e, 8e]: image (B, 3, H, W) -> 4 maps at strides 4, 8, 16, 32."""

    def __init__(
        self, embed_dim: int, depths: list[int], heads: list[int], window: int, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.window = window
        self.channels = [embed_dim * 2**i for i in range(len(depths))]
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            SwinStage(c, d, n, window, rates[s : s + d], first=i == 0)
            for i, (c, d, n, s) in enumerate(zip(self.channels, depths, heads, starts))
        )
        self.apply(_init_weights)

    def forward(self, image: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised image -> [(B, C_i, H_i, W_i)] for i = 0..3 (no fusion)."""
        feats, x = [], image
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def _init_weights(m: nn.Module) -> None:
    """docs/architecture.md#initialisation: Linear trunc_normal(0.02) with bias 0, LayerNorm (1, 0), bias
    tables trunc_normal(0.02)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


_IGNORED_SUFFIXES = ("attn_mask", "relative_position_index")


def _official_to_ours(key: str) -> str | None:
    """Official Swin classification key -> our trunk key; None for keys we drop (head, final norm, buffers).

    `layers.{i}.downsample` sits at the *end* of official stage i and is our stage i+1's downsample.
    """
    if key.startswith(("head.", "norm.")) or key.endswith(_IGNORED_SUFFIXES):
        return None
    if key.startswith("patch_embed."):
        return "stages.0.downsample." + key[len("patch_embed.") :]
    parts = key.split(".")
    if parts[0] == "layers" and len(parts) > 3 and parts[1].isdigit():
        if parts[2] == "blocks":
            return ".".join(["stages", parts[1], *parts[2:]])
        if parts[2] == "downsample":
            return ".".join(["stages", str(int(parts[1]) + 1), *parts[2:]])
    return key


def _resize_bias_table(table: Tensor, rows: int, key: str) -> Tensor:
    """((2w'-1)², n) -> ((2w-1)², n), bicubic over the (2w'-1) x (2w'-1) grid (align_corners=False)."""
    src, tgt = round(table.shape[0] ** 0.5), round(rows**0.5)
    if src * src != table.shape[0]:
        raise LGFormerError(f"Swin weights: {key} has {table.shape[0]} rows, not a square grid")
    n = table.shape[1]
    grid = table.float().t().reshape(1, n, src, src)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.reshape(n, rows).t()


def _short_list(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_swin_pretrained(trunk: SwinTrunk, path: str) -> None:
    """Load an official Swin classification release (e.g. swin_base_patch4_window12_384_22k.pth).

    Drops the classifier head, the final norm and the attn_mask / relative_position_index buffers,
    resizes relative-position tables bicubically when the file's window differs, and requires every
    other key to match our trunk exactly (missing, unexpected or misshapen keys raise LGFormerError).
    """
    if not os.path.isfile(path):
        raise LGFormerError(
            f"Swin weights file not found: {path} (official Swin weights come from the Swin Transformer "
            "release, e.g. swin_base_patch4_window12_384_22k.pth)"
        )
    obj = load_torch_file(path, "Swin weights")
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LGFormerError(f"Swin weights {path}: expected a state dict (optionally under 'model')")

    own = trunk.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        ours = _official_to_ours(key)
        if ours is None:
            continue
        if ours not in own:
            unexpected.append(key)
            continue
        target = own[ours].shape
        if ours.endswith("relative_position_bias_table") and value.shape != target and value.ndim == 2:
            if value.shape[1] != target[1]:
                raise LGFormerError(
                    f"Swin weights {path}: {key} has {value.shape[1]} heads, this trunk needs {target[1]}"
                )
            value = _resize_bias_table(value, target[0], key)
        if value.shape != target:
            raise LGFormerError(
                f"Swin weights {path}: {key} has shape {tuple(value.shape)}, this trunk needs {tuple(target)}"
            )
        mapped[ours] = value
    missing = [k for k in own if k not in mapped]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_short_list(missing)}")
        if unexpected:
            problems.append(f"unexpected {_short_list(unexpected)}")
        raise LGFormerError(f"Swin weights {path} do not fit this trunk: {'; '.join(problems)}")
    trunk.load_state_dict(mapped)
