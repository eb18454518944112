"""MMDLM's training loss: BCE-with-logits per task, masked per sample, weighted across tasks.

The public code (``train_attention.py``) uses ``nn.BCEWithLogitsLoss`` per task
and drops 1p/19q samples whose label is ``Mask`` (label 2) before computing the
1p/19q loss. Its ``Mask`` label is given to every IDH-wildtype tumour and to
IDH-mutant glioblastomas in its label table. We make that rule explicit:

- per WHO CNS5 (2021), 1p/19q co-deletion is assessed only in IDH-mutant
  gliomas (it defines oligodendroglioma); in an IDH-wildtype tumour a 1p/19q
  label is either absent or not meaningful, so by default the 1p/19q loss is
  masked where IDH is wildtype, and wherever the 1p/19q label is unknown;
- ``one_p19q_rule`` switches it: ``"idh_not_wildtype"`` (default: mask where
  IDH is known wildtype; an unknown IDH with a known 1p/19q label is kept,
  because a reported co-deletion implies an IDH-mutant work-up),
  ``"idh_mutant"`` (strict: keep only where IDH is known mutant), or
  ``"labelled"`` (no biological rule: only missing labels are masked).

Labels are coded as in ``models.base.TASKS`` (1 = HGG / IDH-mutant /
1p/19q-codeleted; the public code coded them the other way round). A missing
label is any negative value or NaN (``MISSING = -1``), or False in an
explicit per-task mask.

Reduction: each task's loss is the mean over its unmasked samples (what the
public code does by selecting them); a task with no unmasked sample in the
batch contributes an exact 0 that still keeps the graph. The total is
``sum_t task_weights[t] * loss_t``.

The public code also adds ``0.01 * sum(p**2)`` over the MIL model's
parameters to each loss (an explicit L2 penalty, not Adam weight decay). That
needs the parameters, not the logits, so it is offered as ``l2_penalty``
for the training loop to add; the loss itself does not include it.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from models.mmdlm.network import MMDLM_TASKS

MISSING: int = -1
ONE_P19Q_RULES: tuple[str, ...] = ("idh_not_wildtype", "idh_mutant", "labelled")
PUBLIC_CODE_L2: float = 0.01


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a label is present (not negative, not NaN)."""
    labels = labels.float()
    return ~torch.isnan(labels) & (labels >= 0)


class MMDLMLoss(nn.Module):
    """``forward(logits, targets, masks=None) -> (total, parts)``.

    ``logits[task]``: (B,) as ``MMDLMOutput.logits``; ``targets[task]``: (B,)
    with 0/1 labels, ``MISSING`` (or NaN) where unknown; ``masks[task]``:
    optional (B,) bool, False to exclude a sample (combined with the missing-
    label mask and the 1p/19q rule). ``parts[task]`` is each task's unweighted
    mean loss (a tensor in the graph); ``effective_masks`` says which samples
    counted.
    """

    def __init__(
        self,
        tasks: Iterable[str] = MMDLM_TASKS,
        task_weights: Mapping[str, float] | None = None,
        pos_weight: Mapping[str, float] | None = None,
        one_p19q_rule: str = "idh_not_wildtype",
    ) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and distinct, got {self.tasks}")
        if one_p19q_rule not in ONE_P19Q_RULES:
            raise ValueError(f"one_p19q_rule must be one of {ONE_P19Q_RULES}, got {one_p19q_rule!r}")
        if one_p19q_rule != "labelled" and "1p19q" in self.tasks and "idh" not in self.tasks:
            raise ValueError(f"the 1p/19q rule {one_p19q_rule!r} needs the 'idh' task's labels")
        weights = {task: 1.0 for task in self.tasks}
        for task, value in (task_weights or {}).items():
            if task not in weights:
                raise ValueError(f"task_weights names unknown task {task!r}; tasks are {self.tasks}")
            if value < 0:
                raise ValueError(f"task weight for {task!r} must be >= 0, got {value}")
            weights[task] = float(value)
        self.task_weights: dict[str, float] = weights
        for task in pos_weight or {}:
            if task not in weights:
                raise ValueError(f"pos_weight names unknown task {task!r}; tasks are {self.tasks}")
        self.pos_weight: dict[str, float] = {task: float(v) for task, v in (pos_weight or {}).items()}
        self.one_p19q_rule = one_p19q_rule

    def effective_masks(
        self, targets: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Which samples count for each task, after missing labels, given masks and the 1p/19q rule."""
        result: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            if task not in targets:
                raise ValueError(f"targets lack task {task!r}")
            keep = label_mask(targets[task])
            if masks is not None and task in masks:
                given = masks[task]
                if given.dtype != torch.bool or given.shape != keep.shape:
                    raise ValueError(f"masks[{task!r}] must be bool {tuple(keep.shape)}, got {given.dtype} {tuple(given.shape)}")
                keep = keep & given.to(keep.device)
            result[task] = keep
        if "1p19q" in self.tasks and self.one_p19q_rule != "labelled":
            idh = targets["idh"].float().to(result["1p19q"].device)
            idh_known = label_mask(idh)
            if self.one_p19q_rule == "idh_not_wildtype":
                allowed = ~(idh_known & (idh == 0))
            else:  # "idh_mutant"
                allowed = idh_known & (idh == 1)
            result["1p19q"] = result["1p19q"] & allowed
        return result

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        keep = self.effective_masks(targets, masks)
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for task in self.tasks:
            if task not in logits:
                raise ValueError(f"logits lack task {task!r}")
            logit = logits[task].float()
            target = targets[task].to(logit.device).float()
            if logit.shape != target.shape:
                raise ValueError(f"{task}: logits {tuple(logit.shape)} and targets {tuple(target.shape)} differ")
            task_keep = keep[task].to(logit.device)
            count = task_keep.sum()
            # Replace masked targets by 0 so that MISSING/NaN never reach BCE; their terms are zeroed below.
            safe_target = torch.where(task_keep, target, torch.zeros_like(target))
            pw = None
            if task in self.pos_weight:
                pw = torch.tensor(self.pos_weight[task], device=logit.device, dtype=logit.dtype)
            per_sample = F.binary_cross_entropy_with_logits(logit, safe_target, reduction="none", pos_weight=pw)
            per_sample = torch.where(task_keep, per_sample, torch.zeros_like(per_sample))
            task_loss = per_sample.sum() / count.clamp(min=1).to(per_sample.dtype)
            parts[task] = task_loss
            weighted = self.task_weights[task] * task_loss
            total = weighted if total is None else total + weighted
        if total is None:  # unreachable: __init__ refuses an empty task list
            raise RuntimeError("MMDLMLoss has no tasks")
        return total, parts


def l2_penalty(parameters: Iterable[torch.Tensor], coefficient: float = PUBLIC_CODE_L2) -> torch.Tensor:
    """The public code's explicit ``coefficient * sum(p**2)`` penalty over trainable parameters."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("l2_penalty needs at least one trainable parameter")
    return coefficient * torch.stack([p.pow(2).sum() for p in params]).sum()
