"""What every model family shares: roles, tasks, the prediction type and the family contract.

Each family (``models/fs3dcnn``, ``models/promptnet``, ``models/crossmodal``,
``models/mmdlm``) is a sub-package with the same rooms, as highdicom's object
families are:

- ``network.py``  the ``nn.Module`` (typed constructor, validates its arguments)
- ``loss.py``     its training loss(es), as in the paper
- ``family.py``   a module-level ``FAMILY: ModelFamily`` object binding them: name,
                  input roles, tasks and label coding, default hyper-parameters,
                  default preprocessing spec, ``spec_for(hparams)``, ``build``, ``predict``
                  and ``features`` (what the head reads, for the gate)

``models`` imports nothing from ``dicomnode`` or ``training``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from models.vocab import NON_ENHANCED_ROLES, ROLES, TASKS  # noqa: F401  (re-exported: the families' words)


@dataclass
class Prediction:
    """The output of a family's ``predict``: probabilities per task, and what explains them.

    ``probabilities[task]`` is a float tensor (batch, n_classes) on the CPU,
    rows summing to 1, columns in the order of ``labels[task]``.
    ``explanations`` holds family-specific maps, all on the CPU, e.g.
    ``"slice_attention/T2"``: (batch, n_slices) for MMDLM (rows sum to 1 over
    the real slices), ``"saliency"``: (batch, D, H, W) for the 3D models.
    """

    family: str
    labels: dict[str, tuple[str, ...]]
    probabilities: dict[str, torch.Tensor]
    explanations: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelFamily:
    """The contract that binds a network to its inputs, labels and preprocessing."""

    name: str
    paper: str  # which seed paper it implements, e.g. "seed 000 (adaptive PromptNet)"
    input_roles: tuple[str, ...]  # in channel order; a subset of ROLES
    tasks: Mapping[str, tuple[str, ...]]  # task -> class names (coding)
    default_hparams: Callable[[], dict[str, Any]]
    build: Callable[[Mapping[str, Any]], nn.Module]
    default_spec: Callable[[], dict[str, Any]]  # a preprocessing spec as plain data (models.preprocess)
    predict: Callable[..., Prediction]
    # predict(model, inputs: Mapping[role, Tensor], *, device="cpu", autocast_dtype=None) -> Prediction
    spec_for: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    # the spec whose arrays fit a network built from these hparams: a checkpoint
    # whose spec produces another array shape is refused at save and at load
    features: Callable[..., torch.Tensor] | None = None
    # features(model, inputs: Mapping[role, Tensor], device="cpu") -> (B, F) float32 on the CPU:
    # the penultimate representation the classification head reads (eval mode, no autocast),
    # for the gate's out-of-distribution distance (models.gate.FeatureStats)
