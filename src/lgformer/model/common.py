"""What every box of the network shares: the input normalisation every trunk here expects."""

from __future__ import annotations

# ImageNet mean and std of RGB in [0, 1]: the Swin trunks' and, through its stem's affine, EfficientNet-Lite's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
