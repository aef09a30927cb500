"""The network's contracts: shapes, padding invariance, batch = samples, gradients everywhere."""

from __future__ import annotations

import copy

import pytest
import torch

from lgformer import config as config_mod
from lgformer.model.build import build_model
from lgformer.model.loss import mask_loss

ABLATIONS = {
    "default": [],
    "pwam": ["model.fusion=pwam"],
    "no-l2va": ["model.l2va=false"],
    "sentence-keys": ["model.l2va_keys=sentence"],
    "no-v2la": ["model.v2la=false"],
    "learnable-k1": ["model.query=learnable", "model.num_queries=1"],
    "learnable-k10": ["model.query=learnable", "model.num_queries=10"],
    "no-head-bias": ["model.head_bias=false"],
    "fusion-heads": ["model.fusion_heads=[2,2,2,2]"],
    "paper-loss": [
        "model.loss_resolution=quarter",
        "model.loss_all_outputs=false",
        "model.loss_pos_weight=1.0",
    ],
}


def _model(preset: str, overrides=(), seed: int = 0, jitter: bool = False):
    """A freshly initialised model; `jitter` perturbs every weight so no zero-init hides a gradient."""
    torch.manual_seed(seed)
    cfg = config_mod.load(preset, overrides)
    model = build_model(cfg.model, pretrained=False)
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return model, cfg


def _inputs(batch: int, size: int, lengths: list[int], t: int = 20, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(1000, 5000, (batch, t), generator=g)
    mask = torch.zeros(batch, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    return image, ids, mask


def _assert_all_grads(model, skip=("text_encoder.bert.embeddings", "text_encoder.bert.pooler")):
    """Every trainable parameter gets a gradient (non-zero, except BERT's embedding rows unused here)."""
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or (not n.startswith(skip) and not p.grad.any()))
    ]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    # Only the last stage's gates are frozen, their outputs are never consumed (authors' layout keeps them),
    # and VLBA's sym_value biases, which the instance norm after them removes.
    last_gates = ("image_encoder.vis_gates.3.", "image_encoder.text_gates.3.")
    assert all(n.startswith(last_gates) or n.endswith(".sym_value.bias") for n in frozen)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_parameter_gets_a_gradient_per_ablation(name):
    model, cfg = _model("lite", ABLATIONS[name], jitter=True)
    model.train()
    image, ids, mask = _inputs(2, 64, [5, 9])
    target = (torch.rand(2, 64, 64) > 0.5).float()
    logits = model(image, mask, ids=ids, upsample=False)
    m = cfg.model
    loss = mask_loss(logits, target, m.loss_pos_weight, m.loss_all_outputs, m.loss_resolution)
    loss.backward()
    assert torch.isfinite(loss)
    _assert_all_grads(model)


@pytest.mark.parametrize("preset", ["official-swin-t", "official-swin-b"])
def test_official_presets_train_step(preset):
    model, cfg = _model(preset, ["model.drop_path=0.0"], jitter=True)
    model.train()
    image, ids, mask = _inputs(1, 96, [7])
    logits = model(image, mask, ids=ids, upsample=False)
    assert logits.shape == (1, 7, 24, 24)
    mask_loss(logits, (torch.rand(1, 96, 96) > 0.5).float()).backward()
    _assert_all_grads(model)


def test_output_shape_for_odd_sizes():
    model, _ = _model("lite")
    model.eval()
    image, ids, mask = _inputs(1, 70, [4])
    image = image[..., :61]
    with torch.no_grad():
        logits = model(image, mask, ids=ids)
    assert logits.shape == (1, 4, 70, 61)


@pytest.mark.parametrize(
    "preset, overrides",
    [("lite", []), ("official-swin-t", []), ("lite", ABLATIONS["learnable-k10"])],
    ids=["lite", "official-swin-t", "learnable-k10"],
)
def test_prediction_only_is_the_last_output(preset, overrides):
    """`all_outputs=False` (what inference runs) gives the last map of the full output, at both scales."""
    model, _ = _model(preset, overrides, jitter=True)
    model.eval()
    image, ids, mask = _inputs(2, 64, [5, 12])
    with torch.no_grad():
        for upsample in (False, True):
            full = model(image, mask, ids=ids, upsample=upsample)
            last = model(image, mask, ids=ids, upsample=upsample, all_outputs=False)
            assert last.shape == (2, 1, *full.shape[-2:])
            torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_padded_text_positions_do_not_matter(preset):
    model, _ = _model(preset)
    model.eval()
    image, ids, mask = _inputs(2, 64, [4, 11])
    words = torch.randn(2, 20, model.text_encoder.dim)
    noisy_words = torch.where(mask[..., None].bool(), words, torch.randn_like(words) * 50)
    noisy_ids = torch.where(mask.bool(), ids, torch.randint(1000, 5000, ids.shape))
    with torch.no_grad():
        a = model(image, mask, text_features=words)
        b = model(image, mask, text_features=noisy_words)
        c = model(image, mask, ids=ids)
        d = model(image, mask, ids=noisy_ids)
    assert torch.equal(a, b)
    assert torch.allclose(c, d, atol=1e-5)


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_batch_equals_samples(preset):
    model, _ = _model(preset)
    model.eval()
    image, ids, mask = _inputs(3, 64, [3, 20, 8])
    with torch.no_grad():
        batched = model(image, mask, ids=ids)
        single = torch.cat([model(image[i : i + 1], mask[i : i + 1], ids=ids[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-4), (batched - single).abs().max()


def test_lite_preset_loads_pretrained_encoders_offline_and_trains():
    cfg = config_mod.preset("lite")
    model = build_model(cfg.model, pretrained=True)
    from lgformer.text.tokenizer import Tokenizer

    ids, mask = Tokenizer(cfg.model.text_encoder)(["the red star left of the blue ring", "ring"])
    image = torch.randn(2, 3, 96, 96)
    logits = model(image, mask, ids=ids, upsample=False)
    assert logits.shape == (2, 4, 24, 24)
    mask_loss(logits, (torch.rand(2, 96, 96) > 0.5).float()).backward()
    _assert_all_grads(model)


def test_loss_matches_official_definition():
    logits = torch.randn(2, 7, 8, 8)
    target = (torch.rand(2, 32, 32) > 0.5).float()
    up = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(1.1))
    expected = sum(bce(up[:, k], target) for k in range(7))
    assert torch.allclose(mask_loss(logits, target), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.backbone_weights=/nonexistent/swin_base_patch4_window12_384_22k.pth"], "swin_base_patch4"),
        (["model.text_encoder=/nonexistent/bert-base-uncased"], "/nonexistent/bert-base-uncased"),
    ],
)
def test_missing_pretrained_weights_give_one_line_errors(overrides, needle):
    from lgformer.errors import LGFormerError

    cfg = config_mod.load("official-swin-t", overrides)
    with pytest.raises(LGFormerError) as info:
        build_model(cfg.model, pretrained=True)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_config_values_are_named():
    from lgformer.errors import LGFormerError

    with pytest.raises(LGFormerError, match="valid: vlba, pwam"):
        build_model(config_mod.load("lite", ["model.fusion=film"]).model, pretrained=False)
    with pytest.raises(LGFormerError, match="unknown key 'fuson'"):
        config_mod.load("lite", ["model.fuson=pwam"])
    with pytest.raises(LGFormerError, match="expected an integer"):
        config_mod.load("lite", ["model.decoder_layers=three"])
    with pytest.raises(LGFormerError, match="encoder_fp32_stages=5; valid: 0 to 4"):
        build_model(config_mod.load("lite", ["model.encoder_fp32_stages=5"]).model, pretrained=False)


@pytest.mark.parametrize("preset", ["lite", "official-swin-t"])
def test_training_after_inference_mode_evaluation(preset):
    """Size-keyed caches (window orders, masks, position tables) first filled under inference_mode, as
    validation does, must still serve a training step at the same size afterwards: the same logits and
    gradients as a twin model that never ran under inference_mode."""
    image, ids, mask = _inputs(1, 64, [6])
    target = (torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    built, _ = _model(preset, ["model.drop_path=0.0"])
    runs = []
    for evaluated_first, model in ((True, built), (False, copy.deepcopy(built))):
        if evaluated_first:
            model.eval()
            with torch.inference_mode():
                model(image, mask, ids=ids)
        model.train()
        torch.manual_seed(3)  # the same dropout draws in both
        logits = model(image, mask, ids=ids, upsample=False)
        mask_loss(logits, target).backward()
        runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logits, grads), (twin_logits, twin_grads) = runs
    assert torch.equal(logits, twin_logits)
    assert grads.keys() == twin_grads.keys() and "head.mlp.0.weight" in grads
    for name, grad in grads.items():
        assert torch.equal(grad, twin_grads[name]), name


@pytest.mark.parametrize("exclude", [False, True], ids=["full", "text-encoder-excluded"])
def test_checkpoints_load_without_random_initialisation(tmp_path, monkeypatch, exclude):
    """`load_model` builds the network with `torch.nn.init` switched off: the checkpoint replaces every
    parameter, and an excluded text encoder is loaded whole from its source (as the shipped lite model's).
    No initialiser runs, the network computes exactly what the saved one computes, and the initialisers
    are back afterwards, also when building fails."""
    from lgformer.checkpoint import load_model, save_model
    from lgformer.errors import LGFormerError
    from lgformer.model.build import INITIALISERS, initialisers_off

    cfg = config_mod.load("official-swin-t", ["model.text_encoder=minilm", "model.decoder_layers=1"])
    torch.manual_seed(0)
    saved = build_model(cfg.model, pretrained=exclude).eval()
    save_model(tmp_path, saved, cfg, exclude=("text_encoder.",) if exclude else ())
    calls = []
    for name in INITIALISERS:
        real = getattr(torch.nn.init, name)
        monkeypatch.setattr(
            torch.nn.init, name, lambda t, *a, _f=real, _n=name, **k: calls.append(_n) or _f(t, *a, **k)
        )
    spies = {name: getattr(torch.nn.init, name) for name in INITIALISERS}
    model, _ = load_model(tmp_path)
    assert calls == [] and {name: getattr(torch.nn.init, name) for name in INITIALISERS} == spies
    image, ids = torch.randn(1, 3, 64, 64), torch.tensor([[101, 1996, 2158, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        assert torch.equal(model(image, mask, ids=ids), saved(image, mask, ids=ids))
    with pytest.raises(LGFormerError), initialisers_off():
        build_model(config_mod.load("lite", ["model.fusion=film"]).model)
    assert {name: getattr(torch.nn.init, name) for name in INITIALISERS} == spies
    build_model(cfg.model, pretrained=False)
    assert {"normal_", "trunc_normal_", "xavier_uniform_", "kaiming_uniform_"} <= set(calls)  # they do run


def test_summary_traces_the_shapes_at_the_size_asked(capsys):
    from lgformer.cli import main

    assert main(["summary", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "backbone features at 64x64: (24, 16, 16), (48, 8, 8), (120, 4, 4), (352, 2, 2)" in out
    assert "output logits: (1, 4, 64, 64)" in out
