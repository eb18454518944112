"""The MMDLM family contract: roles, tasks, hyper-parameters, preprocessing spec, build, predict.

Inputs are the three sequences the paper uses (T2, FLAIR, CET1 -> our T1CE),
listed in the repository's canonical ROLES order: ("T1CE", "T2", "FLAIR").

Preprocessing (``default_spec``), and why it differs from the public code:

- The public code resamples to 2 mm slice thickness along the acquisition
  axis (``utils/resampling.py``: nearest-neighbour zoom, in-plane spacing
  untouched), keeps the slices inside a *predefined tumour range* (start/end
  rows of a CSV, i.e. drawn from a segmentation or a reader), keeps a slice
  only where every sequence has signal, crops each slice to its foreground
  box, z-scores each slice per sequence, and stretches it to 224x224.
- At serving time there is no segmentation and no reader, so a tumour range
  cannot exist. We select the slices in the **brain range** instead (every
  axial slice holding brain, by the nonzero brain mask), and training must
  use the same spec: a model trained on tumour-range bags and served on
  brain-range bags would meet a different bag distribution (train/serve skew).
  The gated attention is what lets the model find the tumour slices among
  healthy ones; ``explanations["key_slices/<role>"]`` says which it chose.
- ``count`` = 80: at 2 mm, 80 slices span 160 mm, more than the cranio-caudal
  extent of an adult brain, so no tumour falls outside the bag; shorter
  brains give fewer slices and the rest is padding, masked in the MIL.
- In-plane: resampled to 1 mm and cropped/padded to a 224 x 224 mm field of
  view around the brain (160 mm along z), so every slice has the same
  physical scale, where the public code stretched each slice's own foreground
  box to 224x224 (scale varying per slice). ``slices.size`` then resizes the
  224x224 slice to the network's ``slice_size`` (identity at full size).
- ``models.preprocess`` takes ``count`` evenly spaced slices between the first
  and last brain slice, or all of them (rest padding) when fewer exist.
- Per-slice z-score per sequence, as the public code.

``build`` accepts small sizes through hyper-parameters (``resnet_layers``,
``resnet_widths``, ``mil_*``, ``slice_size``, ``slice_count``; ``spacing_mm`` and
``field_of_view_mm`` shape the spec only) so tests and the
2-core CPU can run the same topology; ``spec_for(hparams)`` gives the matching
spec.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from models.base import TASKS, ModelFamily, Prediction
from models.mmdlm.network import MMDLM, MMDLM_ROLES, MMDLM_TASKS
from models.resnet2d import RESNET34_LAYERS, RESNET34_WIDTHS

NAME = "mmdlm"
SLICE_MASK_KEY = "slice_mask"


def default_hparams() -> dict[str, Any]:
    """Full-size hyper-parameters: the public code's ResNet-34 and MIL head (L = D = 256, fusion 128)."""
    return {
        "in_channels": 1,
        "resnet_layers": list(RESNET34_LAYERS),
        "resnet_widths": list(RESNET34_WIDTHS),
        "mil_hidden_dim": 256,
        "mil_attention_dim": 256,
        "share_mil": True,
        "projection_dim": 128,
        "fusion_dim": 128,
        "dropout": 0.25,
        "attention_dropout": 0.25,
        "extractor_chunk": 64,
        "key_slices": 3,
        # ResNet reduction and pooling (ResNet-34's: stem max pooling, strides 1/2/2/2, average). Small
        # grids: fewer, so the last map keeps a physical size (docs/training-protocols.md).
        "resnet_stem_pool": True,
        "resnet_stage_strides": [1, 2, 2, 2],
        "resnet_pooling": "avg",
        # Preprocessing-facing sizes, recorded so that spec and network travel together.
        "slice_size": [224, 224],
        "slice_count": 80,
        "spacing_mm": [1.0, 1.0, 2.0],
        "field_of_view_mm": [224.0, 224.0, 160.0],
    }


_NETWORK_KEYS: tuple[str, ...] = (
    "in_channels",
    "resnet_layers",
    "resnet_widths",
    "mil_hidden_dim",
    "mil_attention_dim",
    "share_mil",
    "projection_dim",
    "fusion_dim",
    "dropout",
    "attention_dropout",
    "extractor_chunk",
    "key_slices",
    "resnet_stem_pool",
    "resnet_stage_strides",
    "resnet_pooling",
)


def _merged(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = default_hparams()
    unknown = sorted(set(hparams or {}) - set(merged))
    if unknown:
        raise ValueError(f"unknown mmdlm hyper-parameters {unknown}; known: {sorted(merged)}")
    merged.update(hparams or {})
    return merged


def build(hparams: Mapping[str, Any] | None = None) -> MMDLM:
    """An untrained ``MMDLM`` from (partial) hyper-parameters; unknown keys are refused."""
    merged = _merged(hparams)
    size = [int(v) for v in merged["slice_size"]]
    if len(size) != 2 or min(size) < 1 or int(merged["slice_count"]) < 1:
        raise ValueError(f"slice_size must be [H, W] >= 1 and slice_count >= 1, got {size}, {merged['slice_count']}")
    kwargs = {key: merged[key] for key in _NETWORK_KEYS}
    return MMDLM(roles=MMDLM_ROLES, tasks=MMDLM_TASKS, **kwargs)


def spec_for(hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preprocessing spec (``models.preprocess`` format) matching these hyper-parameters."""
    merged = _merged(hparams)
    height, width = (int(v) for v in merged["slice_size"])
    count = int(merged["slice_count"])
    spacing = [float(v) for v in merged["spacing_mm"]]
    fov = [float(v) for v in merged["field_of_view_mm"]]
    if len(spacing) != 3 or len(fov) != 3 or min(spacing) <= 0 or min(fov) <= 0:
        raise ValueError(f"spacing_mm and field_of_view_mm must be three positive numbers, got {spacing}, {fov}")
    # The crop is a physical field of view (voxels = mm / spacing), independent of the network's slice size:
    # a small test spec sees the same brain, resized, rather than a 32 mm patch of it.
    shape = [max(1, round(extent / step)) for extent, step in zip(fov, spacing)]
    return {
        "version": 1,
        "roles": list(MMDLM_ROLES),
        "transforms": [
            {"name": "reorient", "axcodes": "RAS"},
            # 2 mm along the slice axis as the public code; 1 mm in plane (BraTS/SRI24 grid).
            {"name": "resample", "spacing": spacing},
            {"name": "brain_mask", "method": "nonzero"},
            # Fixed physical field of view: 224 x 224 mm in plane, 160 mm (more than a brain) along z.
            {"name": "crop_or_pad", "shape": shape, "anchor": "brain_bbox_center"},
        ],
        "slices": {
            "axis": 2,
            "selection": "brain_range",
            "count": count,
            "size": [height, width],
            # Inside the brain only: the public code cropped each slice to the brain before its
            # per-slice z-score; over the whole slice the background share rescales a small
            # enhancing focus (synthetic cohort: T1CE max AUC 0.80 vs 0.97 with brain statistics).
            "normalize": "zscore_brain_per_slice",
        },
    }


def default_spec() -> dict[str, Any]:
    """Full-size spec: axial slices of the brain range at 2 mm, 224x224, per-slice brain z-score, up to 80."""
    return spec_for(None)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _slices_and_mask(model: MMDLM, inputs: Mapping[str, torch.Tensor], target: torch.device
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The model's roles as float32 (B, S, H, W) on ``target`` and the (B, S) slice mask
    (all True when ``inputs`` has no ``slice_mask``)."""
    missing = [role for role in model.roles if role not in inputs]
    if missing:
        raise ValueError(f"mmdlm needs roles {list(model.roles)}; missing {missing}")
    slices = {role: inputs[role].to(target, dtype=torch.float32) for role in model.roles}
    first = slices[model.roles[0]]
    if first.dim() != 4:
        raise ValueError(f"mmdlm inputs must be (B, S, H, W), got {tuple(first.shape)}")
    if SLICE_MASK_KEY in inputs:
        mask = inputs[SLICE_MASK_KEY].to(target)
    else:
        mask = torch.ones(first.shape[:2], dtype=torch.bool, device=target)
    return slices, mask


def predict(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    key_slices: int | None = None,
) -> Prediction:
    """Probabilities for grade, IDH and 1p/19q plus slice attention and key slices.

    ``inputs``: {"T1CE"|"T2"|"FLAIR": (B, S, H, W) float, "slice_mask": (B, S) bool}.
    A missing ``slice_mask`` means every position is a real slice.
    ``explanations["slice_attention/<role>"]``: (B, S) float32, 0 on padding,
    rows sum to 1. ``explanations["key_slices/<role>"]``: (B, k) int64 slice
    indices, most attended first; -1 where a bag has fewer than k real slices.
    ``key_slices`` defaults to the model's ``key_slices`` (hparam, 3).
    """
    if not isinstance(model, MMDLM):
        raise TypeError(f"mmdlm.predict needs an MMDLM, got {type(model).__name__}")
    k = int(key_slices if key_slices is not None else model.key_slices)
    if k < 1:
        raise ValueError(f"key_slices must be >= 1, got {k}")
    target = torch.device(device)
    slices, mask = _slices_and_mask(model, inputs, target)
    model.eval()
    model.to(target)
    with torch.no_grad(), _autocast(target, autocast_dtype):
        output = model(slices, mask)
    probabilities: dict[str, torch.Tensor] = {}
    for task in model.tasks:
        p = torch.sigmoid(output.logits[task].float())
        probabilities[task] = torch.stack([1.0 - p, p], dim=1).cpu()
    explanations: dict[str, torch.Tensor] = {}
    for role in model.roles:
        weights = output.attention[role].float()
        explanations[f"slice_attention/{role}"] = weights.cpu()
        top = min(k, weights.shape[1])
        ranked = weights.masked_fill(~mask, float("-inf"))
        values, indices = torch.topk(ranked, top, dim=1)
        indices = indices.masked_fill(torch.isinf(values), -1)
        explanations[f"key_slices/{role}"] = indices.cpu()
    return Prediction(
        family=NAME,
        labels={task: TASKS[task] for task in model.tasks},
        probabilities=probabilities,
        explanations=explanations,
    )


def features(model: nn.Module, inputs: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, fusion_dim) float32 on the CPU: the fused vector the three task heads read
    (``model.heads[task](features)`` gives each task's logit). ``inputs`` as for :func:`predict`.
    Eval mode (restored), no gradients, no autocast. For the gate (``models.gate``)."""
    if not isinstance(model, MMDLM):
        raise TypeError(f"mmdlm.features needs an MMDLM, got {type(model).__name__}")
    target = torch.device(device)
    slices, mask = _slices_and_mask(model, inputs, target)
    was_training = model.training
    model.eval()
    model.to(target)
    try:
        with torch.no_grad():
            fused = model(slices, mask).fused
    finally:
        model.train(was_training)
    return fused.detach().float().cpu()


FAMILY = ModelFamily(
    name=NAME,
    paper="seed 002 (MMDLM)",
    input_roles=MMDLM_ROLES,
    tasks={task: TASKS[task] for task in MMDLM_TASKS},
    default_hparams=default_hparams,
    build=build,
    default_spec=default_spec,
    predict=predict,
    spec_for=spec_for,
    features=features,
)
