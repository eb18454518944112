"""PromptNet's training objective (seed 000, eqs. 2-5) and the frozen template that feeds it.

    total = l(f(x), y) + w * l_prompt,   l_prompt = |z_CEF - z_CF|,   w = |f_T(x_CE) - f(x)|

Table 2's three rows are the three ``mode`` values:

- ``"none"``     (no l_prompt, no w_adaptive): total = CE                        (row 1)
- ``"fixed"``    (l_prompt, no w_adaptive):    total = CE + c * l_prompt, c = ``fixed_weight``
                 (eq. 3 has c = 1, the default)                                   (row 2)
- ``"adaptive"`` (l_prompt and w_adaptive):    total = CE + mean_i(w_i * l_prompt_i)  (row 3)

Silent choices, made here and switchable:

- **Classification loss**: cross-entropy on softmax logits (``models.fs3dcnn.loss``), optional
  class weights; the paper names only "l(f(x), y)".
- **l_prompt reduction**: per sample, the *mean* absolute difference over the feature
  dimensions (an L1 norm divided by d). The sum would scale the prompt term with the width of
  the encoder and swamp the cross-entropy; the mean keeps c = 1 meaningful for any width.
  Batch: mean over samples.
- **w_adaptive reduction** (``weight_reduction``): ``"sum"`` (default) over classes is the L1
  norm the paper names ("we adopt the L1 norm"); for two classes it is 2|p_T - p| in [0, 2].
  ``"mean"`` over classes gives |p_T - p| in [0, 1] for two classes (the total-variation
  distance), bounded by the fixed weight c = 1.
- **detach_weight** (default True): w is a *weight*, computed from the probabilities with the
  gradient stopped. Without the stop the student can lower the loss by moving its prediction
  towards the template's instead of learning features: d(w * l_prompt)/d f(x) would push f(x)
  to f_T(x_CE) whenever l_prompt is large.
- **z_CEF and f_T(x_CE) are always detached**, and the template runs frozen (requires_grad
  False) in eval mode under ``torch.no_grad``: no gradient can reach it by construction.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.base import ROLES
from models.common3d import stack_roles
from models.fs3dcnn.loss import classification_loss
from models.fs3dcnn.network import FS3DOutput, FullSequence3DCNN
from models.promptnet.network import PromptNetOutput

PROMPT_MODES: tuple[str, ...] = ("none", "fixed", "adaptive")
WEIGHT_REDUCTIONS: tuple[str, ...] = ("sum", "mean")


@dataclass(frozen=True)
class PromptLossConfig:
    """The loss switches (Table 2 rows and the silent choices), recorded in PromptNet's hparams."""

    mode: str = "adaptive"
    fixed_weight: float = 1.0
    detach_weight: bool = True
    weight_reduction: str = "sum"
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {self.mode!r}")
        if self.weight_reduction not in WEIGHT_REDUCTIONS:
            raise ValueError(f"weight_reduction must be one of {WEIGHT_REDUCTIONS}, got {self.weight_reduction!r}")
        if not self.fixed_weight >= 0.0:
            raise ValueError(f"fixed_weight must be >= 0, got {self.fixed_weight}")

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> "PromptLossConfig":
        """From PromptNet hparams (keys ``prompt_mode``, ``fixed_weight``, ``detach_weight``,
        ``weight_reduction``, ``class_weights``; missing keys take the defaults)."""
        cw = hp.get("class_weights")
        return cls(
            mode=str(hp.get("prompt_mode", "adaptive")),
            fixed_weight=float(hp.get("fixed_weight", 1.0)),
            detach_weight=bool(hp.get("detach_weight", True)),
            weight_reduction=str(hp.get("weight_reduction", "sum")),
            class_weights=None if cw is None else tuple(float(c) for c in cw),
        )


def prompt_l1(z_cf: torch.Tensor, z_cef: torch.Tensor) -> torch.Tensor:
    """Per-sample l_prompt = mean_j |z_CEF_j - z_CF_j| (B,), float32; z_CEF detached."""
    if z_cf.shape != z_cef.shape:
        raise ValueError(
            f"z_CF {tuple(z_cf.shape)} and z_CEF {tuple(z_cef.shape)} differ: PromptNet's "
            "template_feature_dim must equal the template's feature size"
        )
    return (z_cef.detach().float() - z_cf.float()).abs().mean(dim=1)


def adaptive_weight(
    student_probs: torch.Tensor,
    template_probs: torch.Tensor,
    *,
    reduction: str = "sum",
    detach: bool = True,
) -> torch.Tensor:
    """Per-sample w_adaptive = |f_T(x_CE) - f(x)| over classes (B,); template side detached."""
    if reduction not in WEIGHT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {WEIGHT_REDUCTIONS}, got {reduction!r}")
    if student_probs.shape != template_probs.shape:
        raise ValueError(f"probabilities differ in shape: {tuple(student_probs.shape)} vs {tuple(template_probs.shape)}")
    p = student_probs.float()
    if detach:
        p = p.detach()
    gap = (template_probs.detach().float() - p).abs()
    return gap.sum(dim=1) if reduction == "sum" else gap.mean(dim=1)


def promptnet_loss(
    outputs: PromptNetOutput,
    template_outputs: FS3DOutput | None,
    y: torch.Tensor,
    mode: str = "adaptive",
    *,
    fixed_weight: float = 1.0,
    detach_weight: bool = True,
    weight_reduction: str = "sum",
    class_weights: Sequence[float] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, parts): the loss of one Table-2 row; see the module docstring.

    ``template_outputs`` is the frozen template's output on the full-sequence volumes of the
    same samples (may be None only for ``mode="none"``). ``parts`` holds scalar tensors
    ``classification``, ``prompt_l1`` (unweighted mean l_prompt), ``prompt`` (the weighted
    term added to the total, 0 for "none"), ``weight`` (mean weight, detached), ``total``, and
    ``weight_per_sample`` (B,), detached.
    """
    cfg = PromptLossConfig(
        mode=mode,
        fixed_weight=fixed_weight,
        detach_weight=detach_weight,
        weight_reduction=weight_reduction,
        class_weights=None if class_weights is None else tuple(float(c) for c in class_weights),
    )
    ce = classification_loss(outputs.logits, y, class_weights=cfg.class_weights)
    batch = outputs.logits.shape[0]
    zero = ce.new_zeros(())
    if cfg.mode == "none":
        w = ce.new_zeros((batch,))
        l1 = zero if template_outputs is None else prompt_l1(outputs.z_cf, template_outputs.features).mean().detach()
        prompt = zero
    else:
        if template_outputs is None:
            raise ValueError(f"mode={cfg.mode!r} needs the template's outputs (z_CEF, f_T(x_CE))")
        if template_outputs.features.shape[0] != batch:
            raise ValueError(f"template batch {template_outputs.features.shape[0]} != student batch {batch}")
        l1_i = prompt_l1(outputs.z_cf, template_outputs.features)
        if cfg.mode == "fixed":
            w = ce.new_full((batch,), cfg.fixed_weight)
        else:
            w = adaptive_weight(
                outputs.probabilities,
                template_outputs.probabilities,
                reduction=cfg.weight_reduction,
                detach=cfg.detach_weight,
            )
        prompt = (w * l1_i).mean()
        l1 = l1_i.mean().detach()
    total = ce + prompt
    parts = {
        "classification": ce,
        "prompt_l1": l1,
        "prompt": prompt,
        "weight": w.detach().mean(),
        "weight_per_sample": w.detach(),
        "total": total,
    }
    return total, parts


def freeze_template(template: FullSequence3DCNN) -> FullSequence3DCNN:
    """Freeze a trained template in place: no parameter requires grad, eval mode (no dropout)."""
    template.requires_grad_(False)
    template.eval()
    return template


class PromptNetCriterion:
    """Holds the frozen template and the loss switches; call it like a loss.

    ``criterion(student_outputs, full_inputs, y) -> (total, parts)`` where ``full_inputs`` are
    the same samples' four sequences, either (B, 4, D, H, W) in ``ROLES`` order or a mapping
    role -> (B, D, H, W). The template is kept out of PromptNet (so PromptNet's checkpoint
    never contains it) and out of any optimizer; it is put back in eval mode on every call
    and refused if someone has unfrozen it.
    """

    def __init__(self, template: FullSequence3DCNN, config: PromptLossConfig | None = None) -> None:
        self.template = freeze_template(template)
        self.config = config if config is not None else PromptLossConfig()

    def to(self, device: str | torch.device) -> "PromptNetCriterion":
        self.template.to(device)
        return self

    def template_outputs(self, full_inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> FS3DOutput:
        """z_CEF and f_T(x_CE) under ``torch.no_grad``, template in eval mode."""
        if any(p.requires_grad for p in self.template.parameters()):
            raise RuntimeError("the PromptNet template must stay frozen; a parameter requires grad again")
        self.template.eval()
        x = full_inputs if isinstance(full_inputs, torch.Tensor) else stack_roles(full_inputs, ROLES)
        with torch.no_grad():
            return self.template(x)

    def __call__(
        self,
        outputs: PromptNetOutput,
        full_inputs: torch.Tensor | Mapping[str, torch.Tensor] | None,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        t_out = None
        if cfg.mode != "none":
            if full_inputs is None:
                raise ValueError(f"mode={cfg.mode!r} needs the full-sequence inputs for the template")
            t_out = self.template_outputs(full_inputs)
        return promptnet_loss(
            outputs,
            t_out,
            y,
            cfg.mode,
            fixed_weight=cfg.fixed_weight,
            detach_weight=cfg.detach_weight,
            weight_reduction=cfg.weight_reduction,
            class_weights=cfg.class_weights,
        )
