"""Weighted cross-entropy for grading (seed 001).

The paper weights the cross-entropy per class "for controlling the prediction
output" under the LGG/HGG imbalance (BraTS: about 1 LGG for 3.9 HGG), but does
not say how the weights are derived nor how the batch is averaged. Our choices:

- weights: given explicitly, or from class counts as ``N / (K * n_c)`` (the
  "balanced" inverse-frequency scheme: a class twice as rare weighs twice as
  much, and a balanced data set gets weights of exactly 1);
- reduction ``"mean"`` (default): ``1/B * sum_i w[y_i] * -log p_i[y_i]``, the
  textbook formula ``-1/N sum_i sum_c w_c y_ic log p_ic``. PyTorch's own
  ``F.cross_entropy(weight=...)`` divides by ``sum_i w[y_i]`` instead; that is
  ``reduction="weighted_mean"`` here. The two differ in how strongly a batch
  that happens to contain many rare-class samples is weighted.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import TASKS
from models.crossmodal.network import CrossModalOutput

Reduction = Literal["mean", "weighted_mean", "sum"]


def class_weights_from_counts(counts: Sequence[int] | Tensor) -> Tensor:
    """Inverse-frequency class weights ``N / (K * n_c)`` as a float32 tensor.

    Refuses a class with no samples: its weight would be infinite, and a
    training set without one of the grades is a data error to surface.
    """
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if c.numel() < 2:
        raise ValueError(f"crossmodal: need counts for at least 2 classes, got {c.tolist()}")
    if bool((c <= 0).any()):
        raise ValueError(f"crossmodal: every class needs at least one sample to weight it, got counts {c.tolist()}")
    return (c.sum() / (c.numel() * c)).to(torch.float32)


def class_weights_from_labels(labels: Sequence[int] | Tensor, num_classes: int = len(TASKS["grade"])) -> Tensor:
    """Inverse-frequency weights from integer labels (e.g. the training split's grades)."""
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"crossmodal: labels must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]"
        )
    return class_weights_from_counts(torch.bincount(y, minlength=num_classes))


class WeightedCrossEntropyLoss(nn.Module):
    """Class-weighted cross-entropy on the grade logits; see the module docstring for the choices.

    ``class_weights=None`` means all ones (plain cross-entropy). The weights
    are a buffer, so they move with ``.to(device)`` and are saved with the loss.
    """

    def __init__(
        self,
        class_weights: Sequence[float] | Tensor | None = None,
        reduction: Reduction = "mean",
        num_classes: int = len(TASKS["grade"]),
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "weighted_mean", "sum"):
            raise ValueError(f"crossmodal: reduction must be 'mean', 'weighted_mean' or 'sum', got {reduction!r}")
        w = torch.ones(num_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if w.shape != (num_classes,) or bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"crossmodal: class_weights must be {num_classes} finite non-negative numbers, got {w.tolist()}"
            )
        self.register_buffer("class_weights", w.clone())
        self.reduction: Reduction = reduction

    def forward(self, prediction: Tensor | CrossModalOutput, target: Tensor) -> Tensor:
        """prediction: logits (B, K) or the network's output; target: class indices (B,)."""
        logits = prediction.logits if isinstance(prediction, CrossModalOutput) else prediction
        if logits.dim() != 2 or logits.shape[1] != self.class_weights.numel():
            raise ValueError(f"crossmodal: logits must be (B, {self.class_weights.numel()}), got {tuple(logits.shape)}")
        target = target.to(device=logits.device, dtype=torch.long).flatten()
        if target.shape[0] != logits.shape[0]:
            raise ValueError(f"crossmodal: {logits.shape[0]} logits but {target.shape[0]} targets")
        # float32 log-softmax: bf16 log-probabilities lose the small differences training lives on
        nll = -F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        w = self.class_weights.to(logits.device)[target]
        weighted = w * nll
        if self.reduction == "sum":
            return weighted.sum()
        if self.reduction == "weighted_mean":
            return weighted.sum() / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
        return weighted.mean()
