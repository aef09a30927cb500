"""Multi-scale deformable attention (docs/architecture.md#multi-scale-deformable-attention): sampling,
gradients, layout, initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lgformer.model.deformable_attention import MSDeformAttn, ms_deform_attn_sample

SHAPES = [(2, 3), (4, 5), (6, 3)]  # three levels, all non-square and of different sizes


# ----------------------------------------------------------------------------- plain reference
def ref_sample(value, shapes, locations, weights):
    """Per-point bilinear interpolation with explicit loops: x̃ = x·W − 0.5, off-map neighbours are 0."""
    B, _, heads, dh = value.shape
    _, Lq, _, levels, points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    out = torch.zeros(B, Lq, heads, dh, dtype=value.dtype)
    for b in range(B):
        for q in range(Lq):
            for h in range(heads):
                for lvl, (H, W) in enumerate(shapes):
                    for p in range(points):
                        x = locations[b, q, h, lvl, p, 0].item() * W - 0.5
                        y = locations[b, q, h, lvl, p, 1].item() * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < W and 0 <= yi < H:
                                bw = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                a = weights[b, q, h, lvl, p].item()
                                out[b, q, h] += a * bw * value[b, starts[lvl] + yi * W + xi, h]
    return out.view(B, Lq, heads * dh)


def ref_module(m: MSDeformAttn, query, reference_points, value, shapes):
    """The module's forward with the authors' flat index layout spelled out entry by entry."""
    B, Lq, _ = query.shape
    heads, levels, points = m.heads, m.levels, m.points
    off = m.sampling_offsets(query)
    logits = m.attention_weights(query)
    loc = torch.empty(B, Lq, heads, levels, points, 2, dtype=query.dtype)
    a = torch.empty(B, Lq, heads, levels, points, dtype=query.dtype)
    for h in range(heads):
        probs = logits[:, :, h * levels * points : (h + 1) * levels * points].softmax(-1)
        for lvl, (H, W) in enumerate(shapes):
            for p in range(points):
                i = (h * levels + lvl) * points + p
                a[:, :, h, lvl, p] = probs[:, :, lvl * points + p]
                loc[:, :, h, lvl, p, 0] = reference_points[..., 0] + off[:, :, 2 * i] / W
                loc[:, :, h, lvl, p, 1] = reference_points[..., 1] + off[:, :, 2 * i + 1] / H
    v = m.value_proj(value).view(B, value.shape[1], heads, -1)
    return m.output_proj(ref_sample(v, shapes, loc, a))


def random_inputs(B=2, Lq=6, heads=2, dh=3, points=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, heads, dh, generator=g, dtype=dtype)
    loc = torch.rand(B, Lq, heads, len(SHAPES), points, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    loc[0, 0, 0, :, 0] = torch.tensor([-3.0, 0.5], dtype=dtype)  # far outside, left
    loc[0, 1, 1, :, 1] = torch.tensor([0.5, 7.0], dtype=dtype)  # far outside, below
    loc[1, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=dtype)  # corners of the map
    weights = torch.rand(B, Lq, heads, len(SHAPES), points, generator=g, dtype=dtype)
    return value, loc, weights


def small_module(seed=0, **kw) -> MSDeformAttn:
    torch.manual_seed(seed)
    m = MSDeformAttn(**kw)
    with torch.no_grad():  # move away from the init so the offsets depend on the query
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


# ----------------------------------------------------------------------------- sampling
def test_sample_matches_loop_reference_float64():
    value, loc, weights = random_inputs()
    got = ms_deform_attn_sample(value, SHAPES, loc, weights)
    assert got.shape == (2, 6, 6) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref_sample(value, SHAPES, loc, weights), rtol=0, atol=1e-12)


def test_sample_float32_matches_reference():
    value, loc, weights = random_inputs(seed=1)
    got = ms_deform_attn_sample(value.float(), SHAPES, loc.float(), weights.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_sample(value, SHAPES, loc, weights), rtol=0, atol=1e-5)


def test_sample_equals_grid_sample():
    """docs/architecture.md#multi-scale-deformable-attention: grid_sample(bilinear, zeros,
    align_corners=False) at 2·loc − 1, per head, level."""
    value, loc, weights = random_inputs(B=2, Lq=40, heads=3, dh=4, points=3, seed=2)
    B, Lq, heads, levels, points, _ = loc.shape
    starts = [0, 6, 26]
    expected = torch.zeros(B, Lq, heads, 4, dtype=value.dtype)
    for lvl, (H, W) in enumerate(SHAPES):
        maps = value[:, starts[lvl] : starts[lvl] + H * W].permute(0, 2, 3, 1).reshape(B * heads, 4, H, W)
        grid = (2 * loc[:, :, :, lvl] - 1).transpose(1, 2).reshape(B * heads, Lq, points, 2)
        s = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        s = s.view(B, heads, 4, Lq, points).permute(0, 3, 1, 4, 2)  # (B, Lq, heads, points, dh)
        expected += (s * weights[:, :, :, lvl, :, None]).sum(3)
    got = ms_deform_attn_sample(value, SHAPES, loc, weights)
    torch.testing.assert_close(got, expected.view(B, Lq, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "off", [("native-sampler",), ("native-sampler", "bag-sampler")], ids=["bag", "plain"]
)
def test_nan_location_gives_a_nan_sample_on_the_fallback_paths(off: tuple[str, ...]) -> None:
    """Without the C kernel (no compiler), a NaN sampling location (a diverged run) makes its query and head's
    sample NaN, as grid_sample does, and nothing else; the backward runs."""
    from lgformer.model import fast

    value, loc, weights = random_inputs(B=2, Lq=5, heads=3, dh=4, points=2, seed=4)
    loc[1, 2, 0, 1, 1, 0] = float("nan")
    value.requires_grad_()
    with fast.disabled(*off):
        out = ms_deform_attn_sample(value, SHAPES, loc, weights)
        out.sum().backward()
    assert out[1, 2, :4].isnan().all()
    assert not out[1, 2, 4:].isnan().any() and not out[0].isnan().any() and not out[1, :2].isnan().any()


def test_sample_gradcheck():
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 3), (3, 2)]
    value = torch.randn(1, 12, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    loc = (torch.rand(1, 3, 2, 2, 2, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(1, 3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, x, a: ms_deform_attn_sample(v, shapes, x, a), (value, loc, weights)
    )


def test_sample_rejects_mismatched_shapes():
    value, loc, weights = random_inputs()
    with pytest.raises(ValueError):
        ms_deform_attn_sample(value, SHAPES[:2], loc, weights)


# ----------------------------------------------------------------------------- module
def test_parameter_names_and_shapes():
    m = MSDeformAttn()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "sampling_offsets.weight": (192, 256),
        "sampling_offsets.bias": (192,),
        "attention_weights.weight": (96, 256),
        "attention_weights.bias": (96,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }
    S = sum(h * w for h, w in SHAPES)
    out = m(torch.randn(2, 7, 256), torch.rand(2, 7, 2), torch.randn(2, S, 256), SHAPES)
    assert out.shape == (2, 7, 256)


def test_reset_parameters_polar_grid_and_uniform_attention():
    heads, levels, points = 8, 3, 4
    m = small_module(heads=heads, levels=levels, points=points, dim=32)
    m.reset_parameters()
    query = torch.randn(2, 5, 32)
    off = m.sampling_offsets(query).view(2, 5, heads, levels, points, 2)
    for h in range(heads):
        c, s = math.cos(2 * math.pi * h / heads), math.sin(2 * math.pi * h / heads)
        direction = torch.tensor([c, s]) / max(abs(c), abs(s))
        for p in range(points):
            torch.testing.assert_close(off[:, :, h, :, p], direction.expand(2, 5, levels, 2) * (p + 1))
    logits = m.attention_weights(query).view(2, 5, heads, levels * points)
    torch.testing.assert_close(logits.softmax(-1), torch.full_like(logits, 1 / (levels * points)))
    assert m.value_proj.bias.abs().max() == 0 and m.output_proj.bias.abs().max() == 0
    assert m.value_proj.weight.std() > 0 and m.output_proj.weight.std() > 0


def test_module_matches_explicit_layout():
    m = small_module(dim=8, levels=3, heads=2, points=2).double()
    g = torch.Generator().manual_seed(4)
    S = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    ref = torch.rand(1, 5, 2, generator=g, dtype=torch.float64)
    value = torch.randn(2, S, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = m(query, ref, value, SHAPES)
        expected = ref_module(m, query, ref.expand(2, -1, -1), value, SHAPES)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_module_batch_invariant():
    m = small_module(dim=32, heads=4)
    S = sum(h * w for h, w in SHAPES)
    query, ref, value = torch.randn(3, S, 32), torch.rand(3, S, 2), torch.randn(3, S, 32)
    with torch.no_grad():
        batch = m(query, ref, value, SHAPES)
        single = torch.cat([m(query[i : i + 1], ref[i : i + 1], value[i : i + 1], SHAPES) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-6)


def test_module_autocast_bfloat16_and_backward():
    m = small_module(dim=32, heads=4)
    S = sum(h * w for h, w in SHAPES)
    query, ref, value = torch.randn(2, S, 32), torch.rand(2, S, 2), torch.randn(2, S, 32)
    full = m(query, ref, value, SHAPES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(query, ref, value, SHAPES)
    assert low.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() < 0.1 * full.abs().max()
    low.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())
