"""``FAMILY`` for the template / full-sequence 3D CNN of seed 000."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from models.base import ROLES, TASKS, ModelFamily, Prediction
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
from models.fs3dcnn.network import FullSequence3DCNN

NAME = "fs3dcnn"
INPUT_ROLES: tuple[str, ...] = ROLES  # T1, T1CE, T2, FLAIR as channels 0..3
FAMILY_TASKS: dict[str, tuple[str, ...]] = {"grade": TASKS["grade"]}


def default_hparams() -> dict[str, Any]:
    """Encoder/classifier defaults (see ``models.common3d``) plus optional CE class weights."""
    hp: dict[str, Any] = {k: (list(v) if isinstance(v, list) else v) for k, v in ENCODER_DEFAULTS.items()}
    hp["class_weights"] = None
    return hp


def build(hparams: Mapping[str, Any]) -> FullSequence3DCNN:
    """Build from (partial) hparams merged over the defaults; unknown keys are refused."""
    hp = merge_hparams(default_hparams(), hparams, NAME)
    return FullSequence3DCNN(
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
    )


def make_spec(
    shape: Sequence[int] = DEFAULT_INPUT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING
) -> dict[str, Any]:
    """The spec for a given network input size (tests and small CPU models use small sizes)."""
    return volume_spec(INPUT_ROLES, shape, spacing)


def default_spec() -> dict[str, Any]:
    """BraTS at 1 mm, cropped/padded to 160x192x144 around the brain, z-scored in the brain."""
    return make_spec()


def predict(
    model: FullSequence3DCNN,
    inputs: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    saliency: bool = True,
) -> Prediction:
    """Grade probabilities (B, 2) and ``explanations["saliency"]`` (B, D, H, W) Grad-CAM."""
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


def features(model: FullSequence3DCNN, inputs: Mapping[str, torch.Tensor],
             device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, F) float32 on the CPU: z_CEF, the pooled encoder output the three-layer classifier reads
    (``model.classifier(features)`` gives the logits). For the gate (``models.gate``)."""
    return volume_features(model, inputs, roles=INPUT_ROLES, device=device)


def spec_for(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The spec whose volumes fit a network built from ``hparams`` (its ``input_shape``)."""
    return make_spec({**default_hparams(), **dict(hparams)}["input_shape"])


FAMILY = ModelFamily(
    name=NAME,
    paper="seed 000 (template network / 3D CNN FS-MRI)",
    input_roles=INPUT_ROLES,
    tasks=FAMILY_TASKS,
    default_hparams=default_hparams,
    build=build,
    default_spec=default_spec,
    predict=predict,
    spec_for=spec_for,
    features=features,
)
