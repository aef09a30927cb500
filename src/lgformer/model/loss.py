"""Training loss (docs/architecture.md#loss).

Official: sigmoid BCE with pos_weight 1.1 on every output (deep supervision, the initial query
included), at the input resolution after bilinear upsampling, summed over outputs. Paper (Eq. 12-13):
plain BCE between the final prototype's 1/4-scale logits and the 1/4-scale ground truth.
With the no-target head (not in the paper), its BCE on "does the expression name anything?" is added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float = 1.1,
    all_outputs: bool = True,
    resolution: str = "input",
) -> torch.Tensor:
    """logits (B, n, h, w) at 1/4 scale, one map per prototype; target (B, H, W) in {0, 1}."""
    if not all_outputs:
        logits = logits[:, -1:]
    if resolution == "input":
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    elif resolution == "quarter":
        target = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0]
    else:
        raise ValueError(f"loss resolution must be 'input' or 'quarter', got {resolution!r}")
    logits = logits.float()
    target = target.to(logits.dtype)[:, None].expand_as(logits)
    weight = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_output = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="none")
    return per_output.mean(dim=(0, 2, 3)).sum()


def target_loss(target_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The no-target head's BCE: target_logits (B,) against "anything named?" (targets (B,) objects named)."""
    return F.binary_cross_entropy_with_logits(target_logits.float(), (targets > 0).float())
