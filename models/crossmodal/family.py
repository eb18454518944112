"""The ``crossmodal`` family: seed 001's network bound to its inputs, labels and preprocessing.

Default input size. The paper trains on BraTS 2018/2019 (240 x 240 x 155 at
1 mm, skull-stripped, co-registered) without a tumour ROI crop, but the summary
we have does not state the network input size. We choose 64 axial slices of
128 x 128 (tensor (D, H, W) = (64, 128, 128)): resampled to 1.5 x 1.5 x 2.5 mm,
a whole brain (about 140 x 170 x 140 mm) fits into 128 x 128 x 64 voxels after
a crop centred on the brain's bounding box, so nothing is cut, and MC3's
in-plane stride of 16 leaves an 8 x 8 map per slice for the spatial attention
and 64 slices for the slice attention. This is the size typical of 3D BraTS
grading work; ``make_spec`` / the ``input_size`` hyper-parameter change it
together (tests use 16 x 32 x 32).

Axis convention: the network's D axis is the (axial) slice axis. The spec's
``crop_or_pad`` shape is written in RAS (x, y, z) order and the spec ends with
a ``transpose`` to (z, y, x), so ``models.preprocess.apply_spec`` hands over
(D, H, W) = (z, y, x) arrays and no caller has to remember to permute.

Explanations from ``predict``:

- ``"slice_attention"`` (B, D): the mean attention each slice of the primary
  (T1CE) receives in its slice-attention map, i.e. the column mean of a
  row-stochastic D x D matrix, so it sums to 1 over the slices. MC3 never
  down-samples the slice axis, so feature slice d is input slice d.
  ``"slice_attention/<role>"`` gives the same for every active role.
- ``"saliency"`` (B, D, H, W): Grad-CAM of the predicted class over the
  attended high-level maps of all active modalities together (the modalities
  are co-registered, so their maps share one grid), up-sampled trilinearly to
  the input and scaled to [0, 1] per sample. Because the head is global
  average pooling followed by an MLP, the Grad-CAM channel weights are
  exactly d logit / d pooled feature / (D h w); we compute them through the
  classifier only, so the explanation needs no backward pass through the
  backbone (cheap, and works on a fully frozen serving model). It ignores the
  indirect path by which the primary's features also steer the secondaries.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from models.base import ROLES, TASKS, ModelFamily, Prediction
from models.crossmodal.network import CrossModalityNet

NAME = "crossmodal"
DEFAULT_INPUT_SIZE: tuple[int, int, int] = (64, 128, 128)  # (D, H, W) = (z, y, x)
DEFAULT_SPACING_MM: tuple[float, float, float] = (1.5, 1.5, 2.5)  # (x, y, z)


def default_hparams() -> dict[str, Any]:
    """The full-size hyper-parameters (MC3-18 widths and depths), as JSON-able data."""
    return {
        "input_size": list(DEFAULT_INPUT_SIZE),
        "primary": "T1CE",
        # Descending single-modality performance decides the paper's order; this is our
        # prior (FLAIR and T2 show the oedema, T1 least), to be replaced by measured ranks.
        "secondary_order": ["FLAIR", "T2", "T1"],
        "widths": [64, 128, 256, 512],
        "blocks": [2, 2, 2, 2],
        "n_3d_stages": 1,
        "low_level_stages": 1,
        "guide_channels": 64,
        "detach_guidance": False,
        "attention_reduction": 8,
        "norm": "group",
        "norm_groups": 8,
        "hidden": 256,
        "dropout": 0.0,
        # In-plane stride of each residual stage (MC3: 1, 2, 2, 2; with the stem's 2 a 16x in-plane
        # reduction). Small grids: fewer, so the last map keeps a physical size (docs/training-protocols.md).
        "stage_strides": [1, 2, 2, 2],
        # Global pooling of each modality's attended map: "avg" (MC3/DANet) or "max" (a small focal
        # finding is not averaged away; the Grad-CAM weights below are then those of the max position's map).
        "pooling": "avg",
    }


def build(hparams: Mapping[str, Any]) -> CrossModalityNet:
    """Build the network from (a subset of) the hyper-parameters; unknown keys are refused.

    Missing keys take their defaults, so ``build({"input_size": [16, 32, 32],
    "widths": [8, 8, 16, 16]})`` is a tiny model; the resolved hyper-parameters
    are kept on ``model.hparams`` for the checkpoint.
    """
    defaults = default_hparams()
    unknown = sorted(set(hparams) - set(defaults))
    if unknown:
        raise ValueError(f"crossmodal: unknown hyper-parameters {unknown}; known: {sorted(defaults)}")
    resolved = {**defaults, **dict(hparams)}
    return CrossModalityNet(
        input_size=tuple(resolved["input_size"]),
        primary=str(resolved["primary"]),
        secondary_order=tuple(resolved["secondary_order"]),
        widths=tuple(resolved["widths"]),
        blocks=tuple(resolved["blocks"]),
        n_3d_stages=int(resolved["n_3d_stages"]),
        low_level_stages=int(resolved["low_level_stages"]),
        guide_channels=int(resolved["guide_channels"]),
        detach_guidance=bool(resolved["detach_guidance"]),
        attention_reduction=int(resolved["attention_reduction"]),
        norm=resolved["norm"],
        norm_groups=int(resolved["norm_groups"]),
        hidden=int(resolved["hidden"]),
        dropout=float(resolved["dropout"]),
        stage_strides=tuple(int(t) for t in resolved["stage_strides"]),
        pooling=str(resolved["pooling"]),
    )


def make_spec(
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING_MM,
) -> dict[str, Any]:
    """The preprocessing spec for a network input of (D, H, W) = ``input_size`` (plain data).

    Brain mask from non-zero voxels (BraTS is skull-stripped; zero is
    background), crop/pad about the brain's bounding-box centre, z-score inside
    the brain per volume (the usual BraTS normalisation; the paper does not
    name one), then transpose (x, y, z) -> (z, y, x) so the slice axis comes
    first. No slice extraction: this family reads whole volumes.
    """
    d, h, w = (int(s) for s in input_size)
    return {
        "version": 1,
        "roles": list(ROLES),
        "transforms": [
            {"name": "reorient", "axcodes": "RAS"},
            {"name": "resample", "spacing": [float(s) for s in spacing]},
            {"name": "brain_mask", "method": "nonzero"},
            {"name": "crop_or_pad", "shape": [w, h, d], "anchor": "brain_bbox_center"},
            {"name": "normalize", "method": "zscore", "where": "brain"},
            # (x, y, z) -> (z, y, x): the network's D axis is the slice axis
            {"name": "transpose", "axes": [2, 1, 0]},
        ],
        "slices": None,
    }


def default_spec() -> dict[str, Any]:
    """The spec for the default input size: 1.5 x 1.5 x 2.5 mm, 128 x 128 x 64 (x, y, z)."""
    return make_spec(DEFAULT_INPUT_SIZE, DEFAULT_SPACING_MM)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def predict(
    model: CrossModalityNet,
    inputs: Mapping[str, Tensor],
    *,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> Prediction:
    """Grade probabilities (LGG, HGG) plus slice attention and Grad-CAM saliency, on the CPU.

    ``inputs``: role -> preprocessed (B, D, H, W) float tensors; only the
    model's active roles are read (others, e.g. a ``slice_mask``, are ignored).
    Runs in eval mode under ``no_grad``; only the Grad-CAM weights are taken
    with gradients, through the small classifier head.
    """
    dev = torch.device(device)
    model.eval().to(dev)
    dtype = next(model.parameters()).dtype
    volumes = {role: inputs[role].to(dev, dtype) for role in model.active_roles if role in inputs}
    with torch.no_grad(), _autocast(dev, autocast_dtype):
        out = model(volumes)
    probabilities = torch.softmax(out.logits.float(), dim=1)
    predicted = probabilities.argmax(dim=1)

    # Grad-CAM weights: gradient of the predicted logit w.r.t. the pooled features (float32).
    pooled = model.fuse({r: p.to(dtype) for r, p in out.pooled.items()}).detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.classifier(pooled)
        (grad,) = torch.autograd.grad(logits.gather(1, predicted[:, None]).sum(), pooled)
    grad = grad.float()
    c = model.feature_channels
    cam: Tensor | None = None
    for role, features in out.features.items():
        slot = model.roles.index(role)
        weights = grad[:, slot * c : (slot + 1) * c] / features[0, 0].numel()
        term = torch.einsum("bc,bcdhw->bdhw", weights, features.float())
        cam = term if cam is None else cam + term
    assert cam is not None  # the primary is always active
    cam = F.relu(cam)
    first = next(iter(volumes.values()))
    cam = F.interpolate(cam[:, None], size=first.shape[-3:], mode="trilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    saliency = (cam / peak[:, None, None, None]).clamp(0.0, 1.0)

    explanations: dict[str, Tensor] = {"saliency": saliency.detach().cpu()}
    for role, attention in out.slice_attention.items():
        received = attention.float().mean(dim=1)  # column mean of a row-stochastic matrix: sums to 1
        explanations[f"slice_attention/{role}"] = received.cpu()
    explanations["slice_attention"] = explanations[f"slice_attention/{model.primary}"]
    return Prediction(
        family=NAME,
        labels={"grade": TASKS["grade"]},
        probabilities={"grade": probabilities.cpu()},
        explanations=explanations,
    )


def features(model: CrossModalityNet, inputs: Mapping[str, Tensor], device: str | torch.device = "cpu") -> Tensor:
    """(B, 4 * C) float32 on the CPU: the pooled attended features of every modality in fixed
    ``ROLES`` slots (zeros for inactive ones), the vector the classifier MLP reads
    (``model.classifier(features)`` gives the logits). Eval mode (restored), no gradients, no
    autocast. For the gate (``models.gate``)."""
    dev = torch.device(device)
    was_training = model.training
    model.eval().to(dev)
    dtype = next(model.parameters()).dtype
    try:
        volumes = {role: inputs[role].to(dev, dtype) for role in model.active_roles if role in inputs}
        with torch.no_grad():
            fused = model.fuse(model(volumes).pooled)
    finally:
        model.train(was_training)
    return fused.detach().float().cpu()


def spec_for(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The spec whose volumes fit a network built from ``hparams`` (its ``input_size``, D x H x W)."""
    return make_spec({**default_hparams(), **dict(hparams)}["input_size"])


FAMILY = ModelFamily(
    name=NAME,
    paper="seed 001 (cross-modality guidance, dual attention)",
    input_roles=ROLES,
    tasks={"grade": TASKS["grade"]},
    default_hparams=default_hparams,
    build=build,
    default_spec=default_spec,
    predict=predict,
    spec_for=spec_for,
    features=features,
)
