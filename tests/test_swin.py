"""Swin trunk (docs/architecture.md#multi-modal-image-encoder): agreement with a plain reference, key layout,
pretrained loading."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import OFFICIAL

from lgformer.errors import LGFormerError
from lgformer.model.fast import windows
from lgformer.model.swin import SWIN_VARIANTS, PatchMerging, SwinStage, SwinTrunk, load_swin_pretrained

SMALL = (16, [2, 2, 2, 2], [1, 2, 2, 4])  # embed dim, depths, heads: tiny but with every code path


# ----------------------------------------------------------------------------- plain reference
def ref_relative_index(w: int) -> torch.Tensor:
    """idx(a, b) = (ya - yb + w - 1)(2w - 1) + (xa - xb + w - 1), written out entry by entry."""
    idx = torch.empty(w * w, w * w, dtype=torch.long)
    for a in range(w * w):
        for b in range(w * w):
            (ya, xa), (yb, xb) = divmod(a, w), divmod(b, w)
            idx[a, b] = (ya - yb + w - 1) * (2 * w - 1) + (xa - xb + w - 1)
    return idx


def ref_windows(z: torch.Tensor, w: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B, nW, w*w, C), windows and tokens row-major."""
    b, hp, wp, c = z.shape
    out = [z[:, y : y + w, x : x + w].reshape(b, w * w, c) for y in range(0, hp, w) for x in range(0, wp, w)]
    return torch.stack(out, dim=1)


def ref_unwindows(t: torch.Tensor, w: int, hp: int, wp: int) -> torch.Tensor:
    b, _, _, c = t.shape
    z = t.new_zeros(b, hp, wp, c)
    n = 0
    for y in range(0, hp, w):
        for x in range(0, wp, w):
            z[:, y : y + w, x : x + w] = t[:, n].reshape(b, w, w, c)
            n += 1
    return z


def ref_shift_mask(hp: int, wp: int, w: int, s: int) -> torch.Tensor:
    """(nW, M, M): region labels on the unshifted padded grid, 0 inside a region, -100 across."""

    def band(i: int, n: int) -> int:
        return 0 if i < n - w else (1 if i < n - s else 2)

    labels = torch.tensor([[3 * band(y, hp) + band(x, wp) for x in range(wp)] for y in range(hp)])
    win = ref_windows(labels[None, :, :, None], w)[0, :, :, 0]  # (nW, M)
    return torch.where(win[:, :, None] == win[:, None, :], 0.0, -100.0).to(torch.float64)


def ref_block(p: dict[str, torch.Tensor], x: torch.Tensor, heads: int, w: int, shift: bool) -> torch.Tensor:
    """One Swin block on (B, H, W, C) with explicit softmax attention."""
    b, h, wd, c = x.shape
    s = w // 2 if shift else 0
    z = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"], 1e-5)
    hp, wp = math.ceil(h / w) * w, math.ceil(wd / w) * w
    z = torch.cat([z, z.new_zeros(b, h, wp - wd, c)], dim=2)
    z = torch.cat([z, z.new_zeros(b, hp - h, wp, c)], dim=1)
    z = torch.roll(z, (-s, -s), (1, 2))
    t = ref_windows(z, w)  # (B, nW, M, C)
    qkv = t @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
    d = c // heads
    outs = []
    idx = ref_relative_index(w)
    bias = p["attn.relative_position_bias_table"][idx.flatten()].view(w * w, w * w, heads)
    mask = ref_shift_mask(hp, wp, w, s).to(x.dtype) if s else 0.0
    for n in range(heads):
        q = qkv[..., n * d : (n + 1) * d] * d**-0.5
        k = qkv[..., c + n * d : c + (n + 1) * d]
        v = qkv[..., 2 * c + n * d : 2 * c + (n + 1) * d]
        logits = q @ k.transpose(-1, -2) + bias[:, :, n] + mask
        outs.append(torch.softmax(logits, dim=-1) @ v)
    t = torch.cat(outs, dim=-1) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    z = torch.roll(ref_unwindows(t, w, hp, wp), (s, s), (1, 2))[:, :h, :wd]
    x = x + z
    y = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"], 1e-5)
    y = F.gelu(y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x + y


def ref_merge_input(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): sub-grids (0,0), (1,0), (0,1), (1,1), zeros outside."""
    b, h, w, c = x.shape
    out = x.new_zeros(b, (h + 1) // 2, (w + 1) // 2, 4 * c)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            for n, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
                if 2 * i + dy < h and 2 * j + dx < w:
                    out[:, i, j, n * c : (n + 1) * c] = x[:, 2 * i + dy, 2 * j + dx]
    return out


def ref_stage(
    sd: dict[str, torch.Tensor], i: int, x: torch.Tensor, depth: int, heads: int, w: int
) -> torch.Tensor:
    """Stage i of a trunk state dict; x is (B,3,H,W) for i = 0, else the previous (B,H,W,C) map."""
    p = {k[len(f"stages.{i}.") :]: v for k, v in sd.items() if k.startswith(f"stages.{i}.")}
    if i == 0:
        h, wd = x.shape[2:]
        x = F.pad(x, (0, -wd % 4, 0, -h % 4))
        x = F.conv2d(x, p["downsample.proj.weight"], p["downsample.proj.bias"], stride=4).permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], p["downsample.norm.weight"], p["downsample.norm.bias"], 1e-5)
    else:
        x = ref_merge_input(x)
        x = F.layer_norm(x, x.shape[-1:], p["downsample.norm.weight"], p["downsample.norm.bias"], 1e-5)
        x = x @ p["downsample.reduction.weight"].T
    for j in range(depth):
        blk = {k[len(f"blocks.{j}.") :]: v for k, v in p.items() if k.startswith(f"blocks.{j}.")}
        x = ref_block(blk, x, heads, w, shift=j % 2 == 1)
    return x


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that a wrong bias index, mask or order changes the output visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("relative_position_bias_table"):
                p.copy_(noise)
            elif p.ndim == 1:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    ("batch", "tokens", "window", "heads"),
    [(2, (50, 82), 7, 2), (1, (50, 82), 7, 2), (2, (5, 9), 12, 4)],
    ids=["50x82-w7-b2", "50x82-w7-b1", "5x9-w12-smaller-than-window"],
)
@pytest.mark.parametrize(
    "chunk_bytes", [windows.FP32_SCORES_CHUNK_BYTES, 6 * 49 * 49 * 4], ids=["", "tiny-chunks"]
)
def test_stage_matches_reference(batch, tokens, window, heads, chunk_bytes, monkeypatch):
    """Tiny chunks: fp32 inference attends over 1 or 3 windows at a time (remainders included)."""
    monkeypatch.setattr(windows, "FP32_SCORES_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    dim, (h, w) = 32, tokens
    stage = SwinStage(dim, depth=2, heads=heads, window=window, drop_paths=[0.0, 0.0], first=False).eval()
    randomise(stage)
    # the input is an NCHW view of channel-last memory, as the backbone hands it over; odd sizes pad
    x = torch.randn(batch, 2 * h - 1, 2 * w - 1, dim // 2).permute(0, 3, 1, 2)
    sd = {f"stages.1.{k}": v for k, v in stage.state_dict().items()}
    with torch.no_grad():
        out = stage(x)
        ref = ref_stage(sd, 1, x.permute(0, 2, 3, 1), depth=2, heads=heads, w=window)
        assert out.shape == (batch, dim, h, w)
        torch.testing.assert_close(out.permute(0, 2, 3, 1), ref, atol=1e-5, rtol=0)
        assert out.permute(0, 2, 3, 1).is_contiguous()  # NCHW view of channel-last memory
        assert torch.equal(stage(x.contiguous()), out)  # any strides accepted
        # float64: any remaining difference would be a formula difference, not rounding
        stage64 = stage.double()
        sd64 = {k: v.double() for k, v in sd.items()}
        ref64 = ref_stage(sd64, 1, x.double().permute(0, 2, 3, 1), depth=2, heads=heads, w=window)
        torch.testing.assert_close(stage64(x.double()).permute(0, 2, 3, 1), ref64, atol=1e-10, rtol=0)
    # with gradients the windows go through the fused SDPA kernel instead of the explicit CPU form
    torch.testing.assert_close(stage.float()(x).detach().permute(0, 2, 3, 1), ref, atol=1e-5, rtol=0)


def test_trunk_matches_reference_on_odd_image():
    embed, depths, heads = SMALL
    trunk = SwinTrunk(embed, depths, heads, window=7).eval()
    randomise(trunk, seed=1)
    image = torch.randn(2, 3, 61, 97)
    sd = trunk.state_dict()
    with torch.no_grad():
        outs = trunk(image)
        x = image
        for i, (d, n) in enumerate(zip(depths, heads)):
            x = ref_stage(sd, i, x, d, n, 7)
            torch.testing.assert_close(outs[i].permute(0, 2, 3, 1), x, atol=1e-5, rtol=0)
    assert [o.shape[1:] for o in outs] == [(16, 16, 25), (32, 8, 13), (64, 4, 7), (128, 2, 4)]
    assert trunk.channels == [16, 32, 64, 128]


def test_patch_merging_order_and_odd_padding():
    c = 3
    merge = PatchMerging(c)
    x = torch.arange(1 * 5 * 7 * c, dtype=torch.float32).view(1, 5, 7, c) + 1
    seen = []
    merge.norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0]) and None)
    out = merge(x)
    expected = ref_merge_input(x)
    assert torch.equal(seen[0], expected)
    # element check by hand: output pixel (2, 3) = rows 4/5, cols 6/7; row 5 and col 7 are padding
    assert torch.equal(expected[0, 2, 3], torch.cat([x[0, 4, 6], torch.zeros(3 * c)]))
    assert torch.equal(expected[0, 0, 0], torch.cat([x[0, 0, 0], x[0, 1, 0], x[0, 0, 1], x[0, 1, 1]]))
    # the padded zeros pass through the LN (not zeroed afterwards)
    want = (
        F.layer_norm(expected, (4 * c,), merge.norm.weight, merge.norm.bias, 1e-5) @ merge.reduction.weight.T
    )
    torch.testing.assert_close(out, want)
    assert out.shape == (1, 3, 4, 2 * c) and merge.reduction.bias is None


def test_mask_cache_follows_weight_updates_and_training_gets_gradients():
    torch.manual_seed(0)
    stage = SwinStage(16, depth=2, heads=2, window=4, drop_paths=[0.0, 0.0], first=False).eval()
    randomise(stage)
    x = torch.randn(1, 8, 13, 11)
    sd = {f"stages.1.{k}": v for k, v in stage.state_dict().items()}
    with torch.no_grad():
        stage(x)  # fills the caches
        table = stage.blocks[1].attn.relative_position_bias_table
        table.add_(torch.randn_like(table))
        ref = ref_stage(sd, 1, x.permute(0, 2, 3, 1), depth=2, heads=2, w=4)
        torch.testing.assert_close(stage(x).permute(0, 2, 3, 1), ref, atol=1e-5, rtol=0)
    stage.train()
    stage(x).square().mean().backward()
    for block in stage.blocks:
        grad = block.attn.relative_position_bias_table.grad
        assert grad is not None and grad.abs().sum() > 0


def test_drop_path_schedule_and_train_mode():
    trunk = SwinTrunk(*SMALL, window=7, drop_path=0.3)
    rates = [b.drop_path.p for s in trunk.stages for b in s.blocks]
    assert rates == pytest.approx([0.3 * k / 7 for k in range(8)])
    block = trunk.stages[3].blocks[1]
    x = torch.randn(64, 2, 2, 128)
    block.train()
    torch.manual_seed(0)
    a, b = block(x), block(x)
    assert not torch.allclose(a, b)  # stochastic in training
    block.eval()
    assert torch.equal(block(x), block(x))


def test_init_follows_spec():
    trunk = SwinTrunk(*SMALL, window=7)
    blk = trunk.stages[2].blocks[0]
    assert torch.equal(blk.norm1.weight, torch.ones(64)) and torch.equal(blk.norm1.bias, torch.zeros(64))
    assert torch.equal(blk.attn.qkv.bias, torch.zeros(192))
    for t in (blk.attn.qkv.weight, blk.mlp.fc1.weight, blk.attn.relative_position_bias_table):
        assert 0.01 < t.std().item() < 0.03 and t.abs().max().item() <= 2.0


# ----------------------------------------------------------------------------- layout
def _official_rows(name: str) -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in (OFFICIAL / name).read_text().splitlines()[1:]:
        key, shape, kind = line.split("\t")
        rows[key] = (tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), kind)
    return rows


def _official_to_trunk_key(key: str) -> str | None:
    parts = key.split(".")
    if key.startswith("backbone.patch_embed."):
        return "stages.0.downsample." + ".".join(parts[2:])
    if parts[1] == "layers" and parts[3] == "blocks":
        return ".".join(["stages", parts[2], *parts[3:]])
    if parts[1] == "layers" and parts[3] == "downsample":
        return ".".join(["stages", str(int(parts[2]) + 1), *parts[3:]])
    return None


def test_swin_t_names_and_shapes_match_the_authors_backbone():
    rows = _official_rows("official_tiny_w7_keys.tsv")
    trunk = SwinTrunk(*SWIN_VARIANTS["swin-t"], window=7)
    ours = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    want, buffers = {}, {}
    for key, (shape, kind) in rows.items():
        mapped = _official_to_trunk_key(key)
        if mapped is not None:
            (want if kind == "param" else buffers)[mapped] = shape
    assert ours == want
    assert all(k.endswith("relative_position_index") for k in buffers) and len(buffers) == 12
    named_buffers = {k: tuple(v.shape) for k, v in trunk.named_buffers()}
    assert named_buffers == buffers  # present as non-persistent buffers, absent from the state dict
    n_params = sum(p.numel() for p in trunk.parameters())
    assert n_params == sum(math.prod(s) for s in want.values()) == 27_517_818


def test_state_dict_key_names():
    trunk = SwinTrunk(*SMALL, window=7)
    keys = set(trunk.state_dict())
    assert {
        "stages.0.downsample.proj.weight",
        "stages.0.downsample.proj.bias",
        "stages.0.downsample.norm.weight",
        "stages.1.downsample.norm.bias",
        "stages.1.downsample.reduction.weight",
        "stages.3.blocks.1.norm1.weight",
        "stages.3.blocks.1.attn.qkv.bias",
        "stages.3.blocks.1.attn.proj.weight",
        "stages.3.blocks.1.attn.relative_position_bias_table",
        "stages.3.blocks.1.norm2.bias",
        "stages.3.blocks.1.mlp.fc1.weight",
        "stages.3.blocks.1.mlp.fc2.bias",
    } <= keys
    assert not any("relative_position_index" in k or "attn_mask" in k for k in keys)
    assert trunk.stages[0].blocks[0].attn.relative_position_bias_table.shape == (169, 1)


# ----------------------------------------------------------------------------- pretrained loading
def _official_state(trunk: SwinTrunk) -> dict[str, torch.Tensor]:
    """Our trunk's weights in the official classification layout, with the extras a release carries."""
    state = {}
    for key, value in trunk.state_dict().items():
        parts = key.split(".")
        i = int(parts[1])
        if i == 0 and parts[2] == "downsample":
            official = "patch_embed." + ".".join(parts[3:])
        elif parts[2] == "downsample":
            official = ".".join(["layers", str(i - 1), *parts[2:]])
        else:
            official = ".".join(["layers", *parts[1:]])
        state[official] = value.clone()
        if official.endswith("relative_position_bias_table"):
            w = trunk.window
            state[official.replace("bias_table", "index")] = torch.zeros(w * w, w * w, dtype=torch.long)
            state[official.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(
                4, w * w, w * w
            )
    state.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128)})
    state.update({"head.weight": torch.zeros(1000, 128), "head.bias": torch.zeros(1000)})
    return state


def test_load_pretrained_exact_and_resized(tmp_path):
    src = SwinTrunk(*SMALL, window=7)
    randomise(src, seed=3)
    path = tmp_path / "swin_fake_patch4_window7.pth"
    torch.save({"model": _official_state(src)}, path)

    same = SwinTrunk(*SMALL, window=7)
    load_swin_pretrained(same, str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k

    bigger = SwinTrunk(*SMALL, window=12)
    load_swin_pretrained(bigger, str(path))
    for k, v in src.state_dict().items():
        got = bigger.state_dict()[k]
        if k.endswith("relative_position_bias_table"):
            n = v.shape[1]
            grid = v.T.reshape(1, n, 13, 13)
            want = F.interpolate(grid, size=(23, 23), mode="bicubic", align_corners=False).reshape(n, 529).T
            assert got.shape == (529, n)
            torch.testing.assert_close(got, want)
        else:
            assert torch.equal(got, v), k


def test_load_pretrained_errors(tmp_path):
    trunk = SwinTrunk(*SMALL, window=7)
    missing = tmp_path / "nope.pth"
    with pytest.raises(LGFormerError) as err:
        load_swin_pretrained(trunk, str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "swin_base_patch4_window12_384_22k.pth" in msg and "\n" not in msg

    state = _official_state(trunk)
    del state["layers.2.blocks.1.mlp.fc1.bias"]
    state["layers.3.downsample.norm.weight"] = torch.ones(4)
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(LGFormerError, match=r"missing stages\.2\.blocks\.1\.mlp\.fc1\.bias.*unexpected"):
        load_swin_pretrained(trunk, str(path))

    state = _official_state(trunk)
    state["layers.0.downsample.reduction.weight"] = torch.zeros(5, 5)
    torch.save({"model": state}, path)
    with pytest.raises(LGFormerError, match=r"layers\.0\.downsample\.reduction\.weight has shape \(5, 5\)"):
        load_swin_pretrained(trunk, str(path))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_pretrained_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"patch_embed.proj.weight": _Payload(marker)}}, path)
    with pytest.raises(LGFormerError, match="evil.pth"):
        load_swin_pretrained(SwinTrunk(*SMALL, window=7), str(path))
    assert not marker.exists()
