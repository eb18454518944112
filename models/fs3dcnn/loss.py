"""Training loss of the template / FS-MRI 3D CNN: cross-entropy on the grade.

Seed 000 writes the classification loss as l(f(x), y) with probabilistic outputs in
[0, 1]^k and says no more. Categorical cross-entropy over the softmax is the loss that matches
that output (for k = 2 it equals binary cross-entropy on p(HGG)). BraTS2020 is 293 HGG / 76
LGG, so optional class weights are offered; the paper does not mention any (default: none).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def classification_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    *,
    class_weights: Sequence[float] | torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of (B, k) logits against integer labels (B,), computed in float32.

    ``reduction="none"`` gives per-sample losses (PromptNet weights them per sample);
    with class weights, ``"mean"`` is torch's weighted mean (divided by the sum of weights).
    """
    if logits.ndim != 2 or y.ndim != 1 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"expected logits (B, k) and labels (B,), got {tuple(logits.shape)} and {tuple(y.shape)}")
    w: torch.Tensor | None = None
    if class_weights is not None:
        w = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        if w.shape != (logits.shape[1],):
            raise ValueError(f"class_weights must have {logits.shape[1]} entries, got {tuple(w.shape)}")
    return F.cross_entropy(logits.float(), y.long(), weight=w, reduction=reduction)


def fs3dcnn_loss(
    logits: torch.Tensor, y: torch.Tensor, *, class_weights: Sequence[float] | torch.Tensor | None = None
) -> torch.Tensor:
    """The template's training loss (stage 1 of seed 000): mean cross-entropy."""
    return classification_loss(logits, y, class_weights=class_weights)
