"""`lgformer export onnx`: ONNX Runtime reproduces PyTorch on a real photo and sentence (<= 1e-3), opset 18,
dynamic batch and token axes; the grid_sample form of the deformable attention equals the model's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import PHOTOS

from lgformer import config as config_mod
from lgformer.checkpoint import save_model
from lgformer.cli import main
from lgformer.convert.onnx import export_onnx
from lgformer.data.images import image_tensor, load_image
from lgformer.errors import LGFormerError
from lgformer.model.build import build_model
from lgformer.model.deformable_attention import grid_sample_attention, ms_deform_attn_sample
from lgformer.text.tokenizer import Tokenizer

PHOTO = PHOTOS / "COCO_train2014_000000157714.jpg"
SENTENCE = "the white teddy bear sitting on the left"


@pytest.fixture(scope="module")
def lite():
    """The lite network with one decoder and one generator layer (every box still there; a smaller graph
    exports faster) and the no-target head (on the pooled input, the one that reads the mask features too),
    pretrained encoders, untrained heads, at 128 px."""
    overrides = ["data.image_size=128", "model.decoder_layers=1", "model.generator_layers=1"]
    cfg = config_mod.load("lite", [*overrides, "model.no_target_head=true", "model.no_target_input=pooled"])
    torch.manual_seed(0)
    return build_model(cfg.model, pretrained=True).eval(), cfg


@pytest.fixture(scope="module")
def checkpoint(lite, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lite")
    save_model(folder, *lite, exclude=("text_encoder.",))
    return folder


def test_grid_sample_form_equals_the_models_sampling():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (10, 14), (20, 28)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 4, 8, generator=g)
    locations = torch.rand(2, 30, 4, 3, 4, 2, generator=g) * 1.6 - 0.3  # some points off the maps
    weights = torch.rand(2, 30, 4, 3, 4, generator=g)
    expected = ms_deform_attn_sample(value, shapes, locations, weights)
    assert torch.allclose(grid_sample_attention(value, shapes, locations, weights), expected, atol=1e-5)


def test_export_matches_pytorch_on_a_real_photo(checkpoint, lite, tmp_path, capsys):
    path = tmp_path / "lite.onnx"
    argv = ["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(path)]
    assert main([*argv, "--check-image", str(PHOTO), "--check-text", SENTENCE]) == 0
    printed = capsys.readouterr().out
    reported = float(re.search(r"max abs logit difference (\S+)", printed).group(1))
    assert reported <= 1e-3 and "opset 18" in printed

    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert "GridSample" in {node.op_type for node in graph.graph.node}
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input
    }
    assert dims == {
        "image": ["batch", 3, 128, 128],
        "ids": ["batch", "tokens"],
        "attention_mask": ["batch", "tokens"],
    }
    # a model with the no-target head has a second output, `match_logit` (batch,)
    assert [o.name for o in graph.graph.output] == ["logits", "match_logit"]

    # Independently of the export's own check: three sentences of another length, against PyTorch.
    model, cfg = lite  # the weights the checkpoint holds
    sentences = [SENTENCE, "bear", "the person holding the toy bear up high with both hands"]
    ids, mask = Tokenizer(cfg.model.text_encoder, cfg.model.max_tokens)(sentences)
    keep = int(mask.sum(1).max())
    ids, mask = ids[:, :keep], mask[:, :keep]
    image = image_tensor(load_image(PHOTO), 128)[None].expand(3, -1, -1, -1).contiguous()
    with torch.inference_mode():
        logits, match = model(image, mask, ids=ids, with_target=True)
    expected = logits[:, -1].numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, got_match = session.run(
        None, {"image": image.numpy(), "ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    assert got.shape == (3, 128, 128) and got_match.shape == (3,)
    assert np.abs(got - expected).max() <= 1e-3 and np.abs(got_match - match.numpy()).max() <= 1e-3
    assert np.array_equal(got > 0, expected > 0) or np.mean((got > 0) != (expected > 0)) < 1e-4


def test_export_refuses_token_axes_beyond_the_models(lite, tmp_path):
    model, cfg = lite
    with pytest.raises(LGFormerError, match="--max-tokens 40: must be between 2 and the model's 20"):
        export_onnx(model, cfg, tmp_path / "x.onnx", load_image(PHOTO), SENTENCE, max_tokens=40)
    assert not (tmp_path / "x.onnx").exists()


def test_swin_model_exports_too(tmp_path):
    """The paper's backbone (shifted windows, padding to whole windows, per-window masks) exports as well,
    without the no-target head (one output): Swin-T with random weights at 96 px, the same parity bound;
    without onnxscript's rewriting (`--no-optimize`), which takes half of this graph's export time."""
    overrides = ["data.image_size=96", "model.text_encoder=minilm", "model.decoder_layers=1"]
    cfg = config_mod.load("official-swin-t", [*overrides, "model.generator_layers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False).eval()
    path = tmp_path / "swin.onnx"
    assert export_onnx(model, cfg, path, load_image(PHOTO), SENTENCE, optimize=False) <= 1e-3
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits"]
