"""``FAMILY`` for the adaptive PromptNet of seed 000 (contrast-free: T1, T2, FLAIR).

The hparams hold the network's switches and the loss switches (``prompt_mode``,
``fixed_weight``, ``detach_weight``, ``weight_reduction``, ``class_weights``): the loss ones do
not change the network, but a checkpoint must say which Table-2 row it was trained as.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from models.base import NON_ENHANCED_ROLES, TASKS, ModelFamily, Prediction
from models.common3d import (
    DEFAULT_INPUT_SHAPE,
    DEFAULT_SPACING,
    ENCODER_DEFAULTS,
    input_shape_of,
    merge_hparams,
    predict_volume_classifier,
    volume_features,
    volume_spec,
)
from models.promptnet.loss import PromptLossConfig
from models.promptnet.network import PromptNet

NAME = "promptnet"
INPUT_ROLES: tuple[str, ...] = NON_ENHANCED_ROLES  # T1, T2, FLAIR as channels 0..2
FAMILY_TASKS: dict[str, tuple[str, ...]] = {"grade": TASKS["grade"]}


def default_hparams() -> dict[str, Any]:
    """Encoder defaults shared with the template, the branch/fusion switches, the loss switches."""
    hp: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v) for k, v in ENCODER_DEFAULTS.items()}
    hp.update(
        {
            "branch_inputs": "shared",  # or "per_sequence"
            "fusion": "concat",  # or "sum", "gated"
            "template_feature_dim": None,  # None: = widths[-1] (the template's z_CEF size)
            "prompt_mode": "adaptive",  # Table 2: "none" (row 1), "fixed" (row 2), "adaptive" (row 3)
            "fixed_weight": 1.0,
            "detach_weight": True,
            "weight_reduction": "sum",  # L1 norm over classes; "mean" for [0, 1]
            "class_weights": None,
        }
    )
    return hp


def loss_config(hparams: Mapping[str, Any]) -> PromptLossConfig:
    """The loss switches recorded in (partial) hparams, merged over the defaults."""
    return PromptLossConfig.from_hparams(merge_hparams(default_hparams(), hparams, NAME))


def build(hparams: Mapping[str, Any]) -> PromptNet:
    """Build the student from (partial) hparams over the defaults; unknown keys, bad switches
    (including the loss ones) are refused here rather than mid-training."""
    hp = merge_hparams(default_hparams(), hparams, NAME)
    PromptLossConfig.from_hparams(hp)
    tfd = hp["template_feature_dim"]
    return PromptNet(
        in_channels=len(INPUT_ROLES),
        n_classes=len(FAMILY_TASKS["grade"]),
        input_shape=input_shape_of(hp),
        stem_width=int(hp["stem_width"]),
        widths=hp["widths"],
        blocks_per_stage=hp["blocks_per_stage"],
        stem_stride=int(hp["stem_stride"]),
        stage_strides=hp["stage_strides"],
        groups=int(hp["groups"]),
        norm=str(hp["norm"]),
        pooling=str(hp["pooling"]),
        fc_hidden=hp["fc_hidden"],
        dropout=float(hp["dropout"]),
        branch_inputs=str(hp["branch_inputs"]),
        fusion=str(hp["fusion"]),
        template_feature_dim=None if tfd is None else int(tfd),
    )


def make_spec(
    shape: Sequence[int] = DEFAULT_INPUT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING
) -> dict[str, Any]:
    """The spec for a given input size: the template's, without T1CE. The template and the
    student must see identically prepared volumes, or z_CEF and z_CF are not comparable."""
    return volume_spec(INPUT_ROLES, shape, spacing)


def default_spec() -> dict[str, Any]:
    """BraTS at 1 mm, cropped/padded to 160x192x144 around the brain, z-scored in the brain."""
    return make_spec()


def predict(
    model: PromptNet,
    inputs: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    saliency: bool = True,
) -> Prediction:
    """Grade probabilities (B, 2) from T1, T2, FLAIR (T1CE, if given, is ignored) and
    ``explanations["saliency"]`` (B, D, H, W): Grad-CAM summed over all branches.

    No prompt distance is reported: z_CEF needs T1CE, which this path by definition lacks.
    """
    return predict_volume_classifier(
        model,
        inputs,
        roles=INPUT_ROLES,
        family=NAME,
        task="grade",
        labels=FAMILY_TASKS["grade"],
        device=device,
        autocast_dtype=autocast_dtype,
        saliency=saliency,
    )


def features(model: PromptNet, inputs: Mapping[str, torch.Tensor],
             device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, F) float32 on the CPU: the student's fused vector (non-enhanced branches and the
    complementary branch z_CF, per ``fusion``; no T1CE needed), which the classifier reads
    (``model.classifier(features)`` gives the logits). For the gate (``models.gate``)."""
    return volume_features(model, inputs, roles=INPUT_ROLES, device=device)


def spec_for(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The spec whose volumes fit a network built from ``hparams`` (its ``input_shape``)."""
    return make_spec({**default_hparams(), **dict(hparams)}["input_shape"])


FAMILY = ModelFamily(
    name=NAME,
    paper="seed 000 (adaptive PromptNet)",
    input_roles=INPUT_ROLES,
    tasks=FAMILY_TASKS,
    default_hparams=default_hparams,
    build=build,
    default_spec=default_spec,
    predict=predict,
    spec_for=spec_for,
    features=features,
)
