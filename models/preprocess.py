"""Preprocessing as data: a spec that says what a model expects, and ONE function that applies it.

Why a spec and not code paths: the checkpoint stores the spec it was trained
with, and both training and the node call :func:`apply_spec` on it, so a
network can never be served data prepared differently from its training data
(train/serve skew is designed out, not tested for). The shape follows MONAI:
a composed list of small named transforms, each a small function registered
by name, described entirely by JSON-able parameters.

Spec format (``version`` 1)::

    {"version": 1,
     "roles": ["T1", "T2", "FLAIR"],               # subset of models.base.ROLES
     "transforms": [
        {"name": "reorient", "axcodes": "RAS"},
        {"name": "resample", "spacing": [1.0, 1.0, 1.0]},
        {"name": "brain_mask", "method": "nonzero"},
        {"name": "crop_or_pad", "shape": [160, 192, 144], "anchor": "brain_bbox_center"},
        {"name": "normalize", "method": "zscore", "where": "brain"}],
     "slices": null}                               # or a slice-selection block, below

    optional: {"name": "transpose", "axes": [2, 1, 0]}   # array axis order the network wants

    "slices": {"axis": 2, "selection": "brain_range", "count": 24,
               "size": [224, 224], "normalize": "zscore_per_slice"}

:func:`validate_spec` checks a spec and returns it with every default made
explicit, so a checkpoint records the exact parameters it was trained with even
if a default changes later.

Choices this module makes that the papers leave silent (all switchable by the
spec unless said otherwise):

- Geometry: the roles of one case are put on ONE grid. ``resample`` samples
  every role, in world coordinates, onto the grid of the first role of the
  spec's ``roles`` (its field of view, the target spacing, its axis
  directions). This is co-location through the scanner's frame of reference,
  not registration: series of one study share it; motion between series is
  not corrected. Without ``resample`` the roles must already share shape and
  affine after ``reorient`` (else :class:`PreprocessError`).
- Interpolation is linear (``order`` 1), outside the source field of view is 0.
- NaN and infinite voxels (seen in some conversions) are set to 0 on input; the
  count is recorded in ``meta``.
- ``brain_mask`` "nonzero": a voxel is brain when ANY role exceeds the
  threshold (in absolute value); BraTS data are skull-stripped, so this is the
  brain. An empty mask is an error (nothing to normalise or grade).
- ``normalize`` sets voxels outside the brain to 0 after z-scoring within it
  (the BraTS/nnU-Net convention); the standard deviation is the population one
  (ddof 0); a constant image is only centred.
- Slices (MMDLM): MMDLM's code picks slices in a predefined tumour range; the
  node has no tumour segmentation, so ``"brain_range"`` takes ``count``
  evenly spaced slices between the first and last slice that contain brain;
  when fewer brain slices exist, all are taken and the rest are empty slices
  marked False in ``slice_mask`` (the MIL attention ignores them). Each slice
  is resized to ``size`` (linear, pixel-edge aligned, aspect ratio NOT kept:
  MMDLM resizes whole slices too), then z-scored over the whole slice.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as nio
from scipy import ndimage

from models.base import ROLES

SPEC_VERSION = 1
# Two affines are "the same grid" when no entry differs by more than this
# (millimetres for the translation column, unitless*mm for the rest). Converters
# write the same geometry with float32 noise of ~1e-5; a real difference is >> 1e-3.
GEOMETRY_ATOL = 1e-3
#: share of the brain mask that ``crop_or_pad`` may cut before it says the brain was truncated
BRAIN_CUT_TOLERANCE = 0.02

VolumeInput = Union[nib.spatialimages.SpatialImage, tuple[np.ndarray, np.ndarray], str, os.PathLike]


class SpecError(ValueError):
    """A preprocessing spec that does not validate; the message says where and why."""


class PreprocessError(ValueError):
    """Volumes that cannot be prepared as the spec says (missing role, geometry mismatch, empty brain)."""


@dataclass
class PreprocessedCase:
    """One case after :func:`apply_spec`.

    ``arrays[role]`` is float32: (D, H, W) for volume specs, (S, H, W) for slice
    specs. ``slice_mask`` (S,) bool marks real slices (False = padding) and
    ``slice_indices`` (S,) int64 gives the source slice index along the spec's
    axis of the final grid (-1 for padding) so a report can cite key slices.
    ``affine`` is the voxel-to-world matrix of the final 3D grid (before slice
    extraction). ``meta`` records what was done, as JSON-able data.
    """

    arrays: dict[str, np.ndarray]
    affine: np.ndarray
    meta: dict[str, Any]
    mask: np.ndarray | None = None
    slice_mask: np.ndarray | None = None
    slice_indices: np.ndarray | None = None
    template_mask: np.ndarray | None = None


# --------------------------------------------------------------------------- working state


@dataclass
class _Case:
    """Mutable state threaded through the transforms."""

    arrays: dict[str, np.ndarray]
    affines: dict[str, np.ndarray]
    reference: str
    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # clinical transforms (models.clinical): results memoised in ``cache`` when the caller gives one
    cache: MutableMapping[str, Any] | None = None
    content_key: str | None = None
    content_chain: int = 0  # how many transforms had run when content_key was taken
    chain: list[dict[str, Any]] = field(default_factory=list)  # transforms applied so far (keys the memo)
    declared: dict[str, int] = field(default_factory=dict)  # NIfTI sform code per role (4 = MNI)
    rigid: dict[str, np.ndarray] = field(default_factory=dict)  # reference world -> role world (RAS mm)
    registration_reference: str | None = None
    brain: tuple[np.ndarray, np.ndarray, str] | None = None  # (mask, its affine, the role it was made on)
    template_mask: np.ndarray | None = None
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.affines[self.reference]

    def set_shared_affine(self, affine: np.ndarray) -> None:
        for role in self.affines:
            self.affines[role] = affine.copy()


@dataclass(frozen=True)
class _Transform:
    name: str
    validate: Callable[[dict[str, Any], str], dict[str, Any]]
    apply: Callable[[_Case, dict[str, Any]], dict[str, Any]]
    geometric: bool  # defines the grid: must come before every non-geometric transform


_TRANSFORMS: dict[str, _Transform] = {}


def _register(name: str, *, geometric: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``apply`` under ``name``; its validator is ``_validate_<name>``, set below."""

    def deco(apply: Callable[[_Case, dict[str, Any]], dict[str, Any]]) -> Callable[..., Any]:
        _TRANSFORMS[name] = _Transform(name, _VALIDATORS[name], apply, geometric)
        return apply

    return deco


def transform_names() -> tuple[str, ...]:
    """The names a spec's ``transforms`` may use."""
    return tuple(_TRANSFORMS)


# --------------------------------------------------------------------------- validation helpers


def _check_keys(params: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(params) - set(allowed) - {"name"})
    if unknown:
        raise SpecError(f"{where}: unknown parameter(s) {unknown}; allowed: {sorted(allowed)}")


def _number(value: Any, where: str, *, positive: bool = False, minimum: float | None = None,
            maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    if positive and value <= 0:
        raise SpecError(f"{where}: must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{where}: must be <= {maximum}, got {value!r}")
    return float(value)


def _int(value: Any, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise SpecError(f"{where}: must be <= {maximum}, got {value!r}")
    return int(value)


def _choice(value: Any, options: Sequence[str], where: str) -> str:
    if value not in options:
        raise SpecError(f"{where}: expected one of {list(options)}, got {value!r}")
    return str(value)


def _vector(value: Any, n: int, where: str, *, integer: bool) -> list[Any]:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise SpecError(f"{where}: expected a list of {n} {'integers' if integer else 'numbers'}, got {value!r}")
    if integer:
        return [_int(v, f"{where}[{i}]", minimum=1) for i, v in enumerate(value)]
    return [_number(v, f"{where}[{i}]", positive=True) for i, v in enumerate(value)]


def _validate_reorient(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["axcodes"], where)
    codes = p.get("axcodes", "RAS")
    if not isinstance(codes, str) or len(codes) != 3:
        raise SpecError(f"{where}.axcodes: expected three axis letters like 'RAS', got {codes!r}")
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    used = [next((i for i, s in enumerate(pairs) if c in s), None) for c in codes.upper()]
    if None in used or len(set(used)) != 3:
        raise SpecError(f"{where}.axcodes: {codes!r} must name one of L/R, A/P and S/I each")
    return {"name": "reorient", "axcodes": codes.upper()}


def _validate_resample(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["spacing", "order", "min_overlap"], where)
    if "spacing" not in p:
        raise SpecError(f"{where}: 'spacing' (three voxel sizes in mm) is required")
    return {
        "name": "resample",
        "spacing": _vector(p["spacing"], 3, f"{where}.spacing", integer=False),
        "order": _int(p.get("order", 1), f"{where}.order", minimum=0, maximum=3),
        "min_overlap": _number(p.get("min_overlap", 0.25), f"{where}.min_overlap", minimum=0.0, maximum=1.0),
    }


def _validate_brain_mask(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["method", "threshold"], where)
    return {
        "name": "brain_mask",
        "method": _choice(p.get("method", "nonzero"), ["nonzero", "extracted"], f"{where}.method"),
        "threshold": _number(p.get("threshold", 0.0), f"{where}.threshold", minimum=0.0),
    }


def _validate_crop_or_pad(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["shape", "anchor", "pad_value"], where)
    if "shape" not in p:
        raise SpecError(f"{where}: 'shape' (three voxel counts) is required")
    return {
        "name": "crop_or_pad",
        "shape": _vector(p["shape"], 3, f"{where}.shape", integer=True),
        "anchor": _choice(p.get("anchor", "brain_bbox_center"), ["brain_bbox_center", "center", "template_brain_center"],
                          f"{where}.anchor"),
        "pad_value": _number(p.get("pad_value", 0.0), f"{where}.pad_value"),
    }


def _validate_normalize(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["method", "where", "low", "high"], where)
    method = _choice(p.get("method", "zscore"), ["zscore", "percentile"], f"{where}.method")
    out: dict[str, Any] = {
        "name": "normalize",
        "method": method,
        "where": _choice(p.get("where", "brain"), ["brain", "all"], f"{where}.where"),
    }
    if method == "percentile":
        low = _number(p.get("low", 0.5), f"{where}.low", minimum=0.0, maximum=100.0)
        high = _number(p.get("high", 99.5), f"{where}.high", minimum=0.0, maximum=100.0)
        if low >= high:
            raise SpecError(f"{where}: low ({low}) must be below high ({high})")
        out.update(low=low, high=high)
    elif "low" in p or "high" in p:
        raise SpecError(f"{where}: 'low'/'high' apply only to method 'percentile'")
    return out


def _validate_transpose(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["axes"], where)
    axes = p.get("axes")
    if not isinstance(axes, (list, tuple)) or sorted(axes) != [0, 1, 2] or any(isinstance(a, bool) for a in axes):
        raise SpecError(f"{where}.axes: expected a permutation of [0, 1, 2], got {axes!r}")
    return {"name": "transpose", "axes": [int(a) for a in axes]}


def _role_or_auto(value: Any, where: str) -> str:
    if value != "auto" and value not in ROLES:
        raise SpecError(f"{where}: expected 'auto' or one of {list(ROLES)}, got {value!r}")
    return str(value)


def _validate_bias_field(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["shrink_mm", "iterations"], where)
    its = p.get("iterations", [20, 20, 10])
    if not isinstance(its, (list, tuple)) or not its or len(its) > 4:
        raise SpecError(f"{where}.iterations: expected 1-4 iteration counts (one per fitting level), got {its!r}")
    return {"name": "bias_field",
            "shrink_mm": _number(p.get("shrink_mm", 8.0), f"{where}.shrink_mm", positive=True, maximum=16.0),
            "iterations": [_int(i, f"{where}.iterations[{k}]", minimum=1, maximum=500) for k, i in enumerate(its)]}


def _validate_coregister(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["reference", "metric", "sampling", "iterations"], where)
    return {"name": "coregister",
            "reference": _role_or_auto(p.get("reference", "auto"), f"{where}.reference"),
            "metric": _choice(p.get("metric", "mattes_mi"), ["mattes_mi"], f"{where}.metric"),
            "sampling": _number(p.get("sampling", 0.1), f"{where}.sampling", positive=True, maximum=1.0),
            "iterations": _int(p.get("iterations", 200), f"{where}.iterations", minimum=1, maximum=2000)}


def _validate_brain_extract(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["method", "role", "threshold"], where)
    return {"name": "brain_extract",
            "method": _choice(p.get("method", "deepbet"), ["deepbet", "nonzero"], f"{where}.method"),
            "role": _role_or_auto(p.get("role", "auto"), f"{where}.role"),
            "threshold": _number(p.get("threshold", 0.5), f"{where}.threshold", minimum=0.0, maximum=1.0)}


def _validate_atlas_register(p: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(p, ["template", "spacing", "dof", "sampling", "iterations"], where)
    return {"name": "atlas_register",
            "template": _choice(p.get("template", "mni152_2009"), ["mni152_2009"], f"{where}.template"),
            "spacing": _vector(p.get("spacing", [1.0, 1.0, 1.0]), 3, f"{where}.spacing", integer=False),
            "dof": _int(p.get("dof", 12), f"{where}.dof", minimum=7, maximum=12),
            "sampling": _number(p.get("sampling", 0.05), f"{where}.sampling", positive=True, maximum=1.0),
            "iterations": _int(p.get("iterations", 200), f"{where}.iterations", minimum=1, maximum=2000)}


_VALIDATORS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "bias_field": _validate_bias_field,
    "coregister": _validate_coregister,
    "brain_extract": _validate_brain_extract,
    "atlas_register": _validate_atlas_register,
    "transpose": _validate_transpose,
    "reorient": _validate_reorient,
    "resample": _validate_resample,
    "brain_mask": _validate_brain_mask,
    "crop_or_pad": _validate_crop_or_pad,
    "normalize": _validate_normalize,
}

_SLICE_KEYS = ("axis", "selection", "count", "size", "normalize")


def _validate_slices(s: Any) -> dict[str, Any] | None:
    if s is None:
        return None
    if not isinstance(s, Mapping):
        raise SpecError(f"slices: expected null or an object, got {type(s).__name__}")
    _check_keys(s, _SLICE_KEYS, "slices")
    for key in ("count", "size"):
        if key not in s:
            raise SpecError(f"slices: {key!r} is required")
    return {
        "axis": _int(s.get("axis", 2), "slices.axis", minimum=0, maximum=2),
        "selection": _choice(s.get("selection", "brain_range"), ["brain_range", "all"], "slices.selection"),
        "count": _int(s["count"], "slices.count", minimum=1),
        "size": _vector(s["size"], 2, "slices.size", integer=True),
        "normalize": _choice(s.get("normalize", "zscore_per_slice"),
                             ["zscore_per_slice", "zscore_brain_per_slice", "none"],
                             "slices.normalize"),
    }


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a spec and return a deep copy with every default made explicit.

    Raises :class:`SpecError` naming the offending field: unknown transform or
    parameter, bad value, roles outside ``ROLES``, a transform that needs a
    brain mask placed before ``brain_mask``, a geometric transform after a
    non-geometric one, a newer spec version.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(f"spec: expected an object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"version", "roles", "transforms", "slices"})
    if unknown:
        raise SpecError(f"spec: unknown key(s) {unknown}")
    version = spec.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise SpecError(f"spec.version: expected an integer, got {version!r}")
    if version > SPEC_VERSION:
        raise SpecError(f"spec.version {version} is newer than this code reads ({SPEC_VERSION}); upgrade models")
    if version < 1:
        raise SpecError(f"spec.version: must be >= 1, got {version}")
    roles = spec.get("roles")
    if not isinstance(roles, (list, tuple)) or not roles:
        raise SpecError(f"spec.roles: expected a non-empty list of roles from {list(ROLES)}, got {roles!r}")
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise SpecError(f"spec.roles: {bad} not in {list(ROLES)}")
    if len(set(roles)) != len(roles):
        raise SpecError(f"spec.roles: duplicates in {list(roles)}")
    transforms = spec.get("transforms")
    if not isinstance(transforms, (list, tuple)):
        raise SpecError(f"spec.transforms: expected a list, got {transforms!r}")
    out_t: list[dict[str, Any]] = []
    seen_non_geometric: str | None = None
    seen_names: set[str] = set()
    have_mask = False
    for i, t in enumerate(transforms):
        where = f"spec.transforms[{i}]"
        if not isinstance(t, Mapping):
            raise SpecError(f"{where}: expected an object with a 'name', got {t!r}")
        name = t.get("name")
        if name not in _TRANSFORMS:
            raise SpecError(f"{where}: unknown transform {name!r}; known: {list(_TRANSFORMS)}")
        where = f"{where} ({name})"
        tr = _TRANSFORMS[name]
        params = tr.validate(dict(t), where)
        if tr.geometric and seen_non_geometric is not None:
            raise SpecError(f"{where}: a grid-defining transform must come before {seen_non_geometric!r}")
        if not tr.geometric:
            seen_non_geometric = seen_non_geometric or name
        if name == "atlas_register" and "brain_extract" not in seen_names:
            raise SpecError(f"{where}: needs a 'brain_extract' before it (the reference is registered brain to brain)")
        if name == "atlas_register" and "resample" in seen_names or name == "resample" and "atlas_register" in seen_names:
            raise SpecError(f"{where}: 'resample' and 'atlas_register' both define the grid; use one")
        if name == "brain_mask" and params["method"] == "extracted" and "atlas_register" not in seen_names:
            raise SpecError(f"{where}: method 'extracted' needs 'brain_extract' and 'atlas_register' before it")
        seen_names.add(name)
        needs_mask = (
            (name == "crop_or_pad" and params["anchor"] == "brain_bbox_center")
            or (name == "normalize" and params["where"] == "brain")
        )
        if needs_mask and not have_mask:
            raise SpecError(f"{where}: needs a brain mask: put a 'brain_mask' transform before it")
        have_mask = have_mask or name == "brain_mask"
        out_t.append(params)
    slices = _validate_slices(spec.get("slices"))
    if slices is not None and slices["selection"] == "brain_range" and not have_mask:
        raise SpecError("slices.selection 'brain_range' needs a 'brain_mask' transform")
    return {"version": int(version), "roles": list(roles), "transforms": out_t, "slices": slices}


def output_shape(spec: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The shape of each role's array that ``apply_spec`` returns for this spec, known without data.

    (count, H, W) for a slice spec; the crop shape, permuted by later
    ``transpose`` steps, for a volume spec; None when no ``crop_or_pad`` fixes it
    (then the shape depends on the input). Lets a checkpoint prove its spec
    feeds its network before any study arrives.
    """
    clean = validate_spec(spec)
    if clean["slices"] is not None:
        return (clean["slices"]["count"], *clean["slices"]["size"])
    shape: tuple[int, ...] | None = None
    for t in clean["transforms"]:
        if t["name"] == "crop_or_pad":
            shape = tuple(t["shape"])
        elif t["name"] in ("reorient", "resample", "atlas_register"):
            shape = None
        elif t["name"] == "transpose" and shape is not None:
            shape = tuple(shape[a] for a in t["axes"])
    return shape


def volume_spec(roles: Sequence[str], shape: Sequence[int], *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                normalize: str = "zscore") -> dict[str, Any]:
    """The usual 3D spec: RAS, resample, nonzero brain mask, crop/pad around the brain, normalise in brain."""
    return validate_spec({
        "version": SPEC_VERSION,
        "roles": list(roles),
        "transforms": [
            {"name": "reorient", "axcodes": "RAS"},
            {"name": "resample", "spacing": list(spacing)},
            {"name": "brain_mask", "method": "nonzero"},
            {"name": "crop_or_pad", "shape": list(shape), "anchor": "brain_bbox_center"},
            {"name": "normalize", "method": normalize, "where": "brain"},
        ],
        "slices": None,
    })


def slice_spec(roles: Sequence[str], *, count: int, size: Sequence[int] = (224, 224),
               spacing: Sequence[float] = (1.0, 1.0, 1.0), shape: Sequence[int] = (240, 240, 155),
               axis: int = 2) -> dict[str, Any]:
    """The usual 2D-slice spec (MMDLM): RAS, resample, brain mask, crop/pad, slices in the brain range."""
    return validate_spec({
        "version": SPEC_VERSION,
        "roles": list(roles),
        "transforms": [
            {"name": "reorient", "axcodes": "RAS"},
            {"name": "resample", "spacing": list(spacing)},
            {"name": "brain_mask", "method": "nonzero"},
            {"name": "crop_or_pad", "shape": list(shape), "anchor": "brain_bbox_center"},
        ],
        "slices": {"axis": axis, "selection": "brain_range", "count": count, "size": list(size),
                   "normalize": "zscore_per_slice"},
    })


def clinical_transforms(*, spacing: Sequence[float] = (1.0, 1.0, 1.0), bias_field: bool = True,
                        brain_extraction: str = "deepbet") -> list[dict[str, Any]]:
    """The transforms that take a native head to a skull-stripped case on the template grid (BraTS-like)."""
    out: list[dict[str, Any]] = [{"name": "reorient", "axcodes": "RAS"}]
    if bias_field:
        out.append({"name": "bias_field"})
    out += [{"name": "coregister", "reference": "auto"},
            {"name": "brain_extract", "method": brain_extraction, "role": "auto"},
            {"name": "atlas_register", "template": "mni152_2009", "spacing": list(spacing)},
            {"name": "brain_mask", "method": "extracted"}]
    return out


def clinical_volume_spec(roles: Sequence[str], shape: Sequence[int], *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                         normalize: str = "zscore", bias_field: bool = True) -> dict[str, Any]:
    """The 3D spec for clinical input: bias field, co-registration, brain extraction, MNI152 grid, crop, normalise.

    The crop is centred on the template's brain (not on each case's brain):
    in template space every brain sits in the same place, and a fixed window
    keeps the anatomy at the same voxel for every case.
    """
    return validate_spec({
        "version": SPEC_VERSION,
        "roles": list(roles),
        "transforms": [*clinical_transforms(spacing=spacing, bias_field=bias_field),
                       {"name": "crop_or_pad", "shape": list(shape), "anchor": "template_brain_center"},
                       {"name": "normalize", "method": normalize, "where": "brain"}],
        "slices": None,
    })


def clinical_slice_spec(roles: Sequence[str], *, count: int, size: Sequence[int] = (224, 224),
                        spacing: Sequence[float] = (1.0, 1.0, 1.0), shape: Sequence[int] = (192, 224, 160),
                        axis: int = 2, bias_field: bool = True,
                        normalize: str = "zscore_brain_per_slice") -> dict[str, Any]:
    """The 2D-slice spec (MMDLM) for clinical input: the clinical transforms, then slices in the brain range."""
    return validate_spec({
        "version": SPEC_VERSION,
        "roles": list(roles),
        "transforms": [*clinical_transforms(spacing=spacing, bias_field=bias_field),
                       {"name": "crop_or_pad", "shape": list(shape), "anchor": "template_brain_center"}],
        "slices": {"axis": axis, "selection": "brain_range", "count": count, "size": list(size),
                   "normalize": normalize},
    })


def clinical_variant(spec: Mapping[str, Any], *, bias_field: bool = True) -> dict[str, Any]:
    """The clinical form of a BraTS-style spec: same roles, grid spacing, crop and normalisation, native heads in.

    ``resample`` (co-location through the scanner frame) becomes the clinical
    chain at the same spacing; the ``nonzero`` brain mask becomes the extracted
    one; a crop anchored on each case's brain is anchored on the template's
    brain instead (one window for every case in template space). A spec that
    is already clinical comes back validated, unchanged.
    """
    clean = validate_spec(spec)
    if is_clinical(clean):
        return clean
    out: list[dict[str, Any]] = []
    for t in clean["transforms"]:
        if t["name"] == "resample":
            out += [x for x in clinical_transforms(spacing=t["spacing"], bias_field=bias_field)
                    if x["name"] not in ("reorient", "brain_mask")]
        elif t["name"] == "brain_mask":
            out.append({"name": "brain_mask", "method": "extracted"})
        elif t["name"] == "crop_or_pad" and t["anchor"] == "brain_bbox_center":
            out.append({**t, "anchor": "template_brain_center"})
        else:
            out.append(dict(t))
    if not any(t["name"] == "atlas_register" for t in out):
        raise SpecError("clinical_variant: the spec has no 'resample' step to replace with the clinical chain")
    return validate_spec({**clean, "transforms": out})


def is_clinical(spec: Mapping[str, Any]) -> bool:
    """Whether a spec brings native heads into template space (brain extraction + atlas registration)."""
    names = {t.get("name") for t in spec.get("transforms", [])}
    return {"brain_extract", "atlas_register"} <= names


# --------------------------------------------------------------------------- transforms


def _aff_list(a: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(a, dtype=np.float64)]


def _reorient(case: _Case, p: dict[str, Any]) -> dict[str, Any]:
    """Flip/permute each role's voxel axes so they point along ``axcodes`` (no interpolation)."""
    target = nio.axcodes2ornt(tuple(p["axcodes"]))
    done: dict[str, Any] = {}
    for role, data in case.arrays.items():
        affine = case.affines[role]
        current = nio.io_orientation(affine)
        xform = nio.ornt_transform(current, target)
        done[role] = "".join(nio.aff2axcodes(affine))
        if np.array_equal(xform, [[0, 1], [1, 1], [2, 1]]):
            continue
        case.arrays[role] = np.ascontiguousarray(nio.apply_orientation(data, xform))
        case.affines[role] = affine @ nio.inv_ornt_aff(xform, data.shape)
    return {"from": done, "to": p["axcodes"]}


def _resample(case: _Case, p: dict[str, Any]) -> dict[str, Any]:
    """Sample every role onto one grid: the reference role's field of view at ``spacing``.

    The target grid keeps the reference role's axis directions and the outer
    edge of its field of view (voxel corners, not centres, so the covered
    extent is unchanged); its shape is the extent divided by the spacing,
    rounded. Every role is then interpolated in world coordinates (scanner
    frame), which makes the result affine-correct: a landmark keeps its world
    position. ``min_overlap``: a role that covers less than this fraction of
    the grid is refused (a different frame of reference, a scout series).
    """
    ref_aff = case.affines[case.reference]
    ref_shape = np.array(case.arrays[case.reference].shape, dtype=np.float64)
    zooms = np.sqrt((ref_aff[:3, :3] ** 2).sum(axis=0))
    directions = ref_aff[:3, :3] / zooms
    spacing = np.array(p["spacing"], dtype=np.float64)
    shape = tuple(int(max(1, round(n))) for n in ref_shape * zooms / spacing)
    new_aff = np.eye(4)
    new_aff[:3, :3] = directions * spacing
    corner = ref_aff[:3, :3] @ np.full(3, -0.5) + ref_aff[:3, 3]
    new_aff[:3, 3] = corner - new_aff[:3, :3] @ np.full(3, -0.5)
    overlaps: dict[str, float] = {}
    for role, data in case.arrays.items():
        src_aff = case.affines[role]
        if data.shape == shape and np.allclose(src_aff, new_aff, atol=GEOMETRY_ATOL):
            overlaps[role] = 1.0
            continue
        m = np.linalg.inv(src_aff) @ new_aff
        overlaps[role] = _overlap(m, shape, data.shape)
        if overlaps[role] < p["min_overlap"]:
            raise PreprocessError(
                f"role {role} covers only {overlaps[role]:.0%} of the {case.reference} grid "
                f"(min_overlap {p['min_overlap']:.0%}): the series do not share a field of view "
                f"or frame of reference")
        case.arrays[role] = ndimage.affine_transform(
            data, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=p["order"],
            mode="constant", cval=0.0, prefilter=p["order"] > 1).astype(np.float32, copy=False)
    case.set_shared_affine(new_aff)
    return {"spacing": p["spacing"], "shape": list(shape), "reference": case.reference,
            "overlap": overlaps, "source_zooms": [float(z) for z in zooms]}


def _overlap(m: np.ndarray, out_shape: tuple[int, ...], in_shape: tuple[int, ...]) -> float:
    """Fraction of the target grid (sampled on a coarse lattice) that falls inside the source volume."""
    axes = [np.linspace(0, n - 1, num=min(n, 24)) for n in out_shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    src = pts @ m[:3, :3].T + m[:3, 3]
    inside = np.all((src >= -0.5) & (src <= np.array(in_shape) - 0.5), axis=1)
    return float(inside.mean())


def _brain_mask(case: _Case, p: dict[str, Any]) -> dict[str, Any]:
    """Brain = voxels where any role's magnitude exceeds ``threshold`` (data are skull-stripped), or the extracted mask.

    ``extracted``: the mask ``brain_extract`` made, carried onto the grid by
    ``atlas_register``; everything outside it is set to 0 in every role, so a
    native head leaves this step looking like a skull-stripped BraTS volume.
    """
    if p["method"] == "extracted":
        if case.mask is None or not case.mask.any():
            raise PreprocessError("brain mask is empty after registration to the template")
        for role in case.arrays:
            case.arrays[role] = np.where(case.mask, case.arrays[role], np.float32(0)).astype(np.float32)
        return {"method": "extracted", "voxels": int(case.mask.sum()), "bbox": _bbox(case.mask)}
    mask = np.zeros(next(iter(case.arrays.values())).shape, dtype=bool)
    for data in case.arrays.values():
        mask |= np.abs(data) > p["threshold"]
    if not mask.any():
        raise PreprocessError(f"brain mask is empty: no voxel of {list(case.arrays)} exceeds {p['threshold']}")
    case.mask = mask
    return {"voxels": int(mask.sum()), "bbox": _bbox(mask)}


def _bbox(mask: np.ndarray) -> list[list[int]]:
    """[[start, stop), ...] per axis of the True voxels."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append([int(idx[0]), int(idx[-1]) + 1])
    return out


def _crop_or_pad(case: _Case, p: dict[str, Any]) -> dict[str, Any]:
    """A window of ``shape`` centred on the brain's bounding box (or the volume), padded where it leaves the volume."""
    src_shape = next(iter(case.arrays.values())).shape
    target = p["shape"]
    if p["anchor"] == "brain_bbox_center":
        assert case.mask is not None  # guaranteed by validate_spec
        box = _bbox(case.mask)
        centre = [(a + b) / 2.0 for a, b in box]
    elif p["anchor"] == "template_brain_center":
        # in template space every brain sits where the template's does: one fixed window for all cases
        if case.template_mask is None:
            raise PreprocessError("crop_or_pad: anchor 'template_brain_center' needs 'atlas_register' before it")
        box = _bbox(case.template_mask)
        centre = [(a + b) / 2.0 for a, b in box]
    else:
        box = None
        centre = [n / 2.0 for n in src_shape]
    # start so that the window's centre is the anchor; floor keeps it deterministic
    start = [int(math.floor(c - t / 2.0 + 0.5)) for c, t in zip(centre, target)]
    stop = [s + t for s, t in zip(start, target)]

    def window(a: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(target, fill, dtype=a.dtype)
        src = tuple(slice(max(s, 0), min(e, n)) for s, e, n in zip(start, stop, a.shape))
        dst = tuple(slice(max(s, 0) - s, min(e, n) - s) for s, e, n in zip(start, stop, a.shape))
        out[dst] = a[src]
        return out

    for role in case.arrays:
        case.arrays[role] = window(case.arrays[role], p["pad_value"])
    truncated, cut_share = False, 0.0
    if case.mask is not None:
        before = int(case.mask.sum())
        case.mask = window(case.mask, False)
        cut_share = (before - int(case.mask.sum())) / max(before, 1)
        # A whole-head brain mask runs down the brainstem into the neck; the last centimetre of it
        # below the model's window is no loss for grading a glioma. Up to 2 % of the mask may go.
        truncated = cut_share > BRAIN_CUT_TOLERANCE
    if case.template_mask is not None:
        case.template_mask = window(case.template_mask, False)
    shift = np.eye(4)
    shift[:3, 3] = start
    case.set_shared_affine(case.affine @ shift)
    return {"box": [[s, e] for s, e in zip(start, stop)], "source_shape": list(src_shape),
            "brain_bbox": box, "brain_truncated": truncated, "brain_cut_share": round(cut_share, 4)}


def _normalize(case: _Case, p: dict[str, Any]) -> dict[str, Any]:
    """Per role: z-score or percentile clip + scale to [0, 1], statistics taken within the brain (or everywhere)."""
    region = case.mask if p["where"] == "brain" else None
    stats: dict[str, Any] = {}
    for role, data in case.arrays.items():
        values = data[region] if region is not None else data.reshape(-1)
        if values.size == 0:
            raise PreprocessError(f"normalize: no voxel of {role} inside the brain mask")
        v64 = values.astype(np.float64)
        if p["method"] == "zscore":
            mean, std = float(v64.mean()), float(v64.std())
            scale = std if std > 1e-8 else 1.0
            out = (data.astype(np.float64) - mean) / scale
            stats[role] = {"mean": mean, "std": std}
        else:
            lo, hi = (float(x) for x in np.percentile(v64, [p["low"], p["high"]]))
            width = hi - lo if hi - lo > 1e-8 else 1.0
            out = (np.clip(data.astype(np.float64), lo, hi) - lo) / width
            stats[role] = {"low": lo, "high": hi}
        if region is not None:
            out[~region] = 0.0
        case.arrays[role] = out.astype(np.float32)
    return {"method": p["method"], "where": p["where"], "stats": stats}


def _transpose(case: _Case, p: dict[str, Any]) -> dict[str, Any]:
    """Permute the array axes (output axis k = input axis ``axes[k]``), keeping the affine true.

    Why: a network may want its axes in another order than the spec's grid, e.g.
    (D, H, W) = (z, y, x) for one that treats D as the slice axis. Doing it in
    the spec keeps "what the model expects" in the checkpoint, instead of a
    transpose every caller must remember. Transforms after it (crop shapes,
    the slice axis) refer to the permuted axes.
    """
    axes = p["axes"]
    for role in case.arrays:
        case.arrays[role] = np.ascontiguousarray(np.transpose(case.arrays[role], axes))
    if case.mask is not None:
        case.mask = np.ascontiguousarray(np.transpose(case.mask, axes))
    if case.template_mask is not None:
        case.template_mask = np.ascontiguousarray(np.transpose(case.template_mask, axes))
    perm = np.zeros((4, 4))
    perm[3, 3] = 1.0
    for k, a in enumerate(axes):
        perm[a, k] = 1.0  # old index[a] = new index[k]
    case.set_shared_affine(case.affine @ perm)
    return {"axes": axes}


from models import clinical as _clinical  # noqa: E402  (its transforms register below)

for _name, _fn, _geo in [
    ("bias_field", _clinical.bias_field, True),
    ("coregister", _clinical.coregister, True),
    ("brain_extract", _clinical.brain_extract, True),
    ("atlas_register", _clinical.atlas_register, True),
    ("reorient", _reorient, True),
    ("resample", _resample, True),
    ("brain_mask", _brain_mask, False),
    ("crop_or_pad", _crop_or_pad, False),
    ("normalize", _normalize, False),
    ("transpose", _transpose, False),
]:
    _register(_name, geometric=_geo)(_fn)


# --------------------------------------------------------------------------- slices


def _select_slices(case: _Case, s: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict]:
    axis, count = s["axis"], s["count"]
    n = next(iter(case.arrays.values())).shape[axis]
    if s["selection"] == "brain_range":
        assert case.mask is not None
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(case.mask.any(axis=other))
        if present.size == 0:
            raise PreprocessError("slices: the brain mask is empty after cropping")
        lo, hi = int(present[0]), int(present[-1])
    else:
        lo, hi = 0, n - 1
    available = hi - lo + 1
    if available >= count:
        # evenly spaced, both ends included; spacing >= 1 so the rounded indices are distinct
        picked = np.round(np.linspace(lo, hi, count)).astype(np.int64)
    else:
        picked = np.arange(lo, hi + 1, dtype=np.int64)
    indices = np.full(count, -1, dtype=np.int64)
    indices[: picked.size] = picked
    slice_mask = indices >= 0
    out: dict[str, np.ndarray] = {}
    brain: np.ndarray | None = None
    if s["normalize"] == "zscore_brain_per_slice":
        if case.mask is None:
            raise PreprocessError("slices: zscore_brain_per_slice needs a brain_mask transform")
        mstack = np.moveaxis(case.mask, axis, 0)
        brain = np.stack([_resize2d(mstack[idx].astype(np.float32), s["size"]) > 0.5 for idx in picked]) \
            if picked.size else np.zeros((0, *s["size"]), dtype=bool)
    for role, data in case.arrays.items():
        stack = np.moveaxis(data, axis, 0)
        res = np.zeros((count, *s["size"]), dtype=np.float32)
        for k, idx in enumerate(picked):
            res[k] = _resize2d(stack[idx], s["size"])
            if s["normalize"] == "zscore_per_slice":
                m, sd = float(res[k].mean(dtype=np.float64)), float(res[k].std(dtype=np.float64))
                res[k] = (res[k] - m) / (sd if sd > 1e-8 else 1.0)
            elif brain is not None:
                # Statistics of the brain pixels only, background set to 0: a slice's
                # background share changes along the head and would otherwise rescale
                # (and blunt) a small enhancing focus.
                inside = brain[k]
                if inside.any():
                    vals = res[k][inside].astype(np.float64)
                    m, sd = float(vals.mean()), float(vals.std())
                    res[k] = np.where(inside, (res[k] - m) / (sd if sd > 1e-8 else 1.0), 0.0)
                else:
                    res[k] = 0.0
        out[role] = res
    meta = {"axis": axis, "range": [lo, hi], "count": count, "real": int(picked.size),
            "indices": indices.tolist(), "size": s["size"], "normalize": s["normalize"]}
    return out, slice_mask, indices, meta


def _resize2d(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Linear resize with pixel edges aligned (torch's align_corners=False); identity when sizes match."""
    if tuple(img.shape) == tuple(size):
        return img.astype(np.float32, copy=True)
    zoom = (size[0] / img.shape[0], size[1] / img.shape[1])
    out = ndimage.zoom(img.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)
    return out[: size[0], : size[1]]


# --------------------------------------------------------------------------- entry points


def _declared_code(value: Any) -> int:
    """The NIfTI sform code (qform when no sform) of an image: 4 declares MNI152 space; 0 for arrays."""
    header = getattr(value, "header", None)
    if header is None or not hasattr(header, "get_sform"):
        return 0
    code = int(header.get_sform(coded=True)[1] or 0)
    return code or int(header.get_qform(coded=True)[1] or 0)


def _load_volume(role: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(value, (str, os.PathLike)):
        value = nib.load(os.fspath(value))
    if isinstance(value, nib.spatialimages.SpatialImage):
        data = np.asarray(value.get_fdata(dtype=np.float32))
        affine = np.asarray(value.affine, dtype=np.float64)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        data = np.asarray(value[0], dtype=np.float32)
        affine = np.asarray(value[1], dtype=np.float64)
    else:
        raise PreprocessError(f"role {role}: expected a nibabel image, a path or (array, affine), got {type(value).__name__}")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PreprocessError(f"role {role}: expected a 3D volume, got shape {data.shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise PreprocessError(f"role {role}: affine must be a finite, invertible 4x4 matrix")
    return np.ascontiguousarray(data, dtype=np.float32), affine


def _require_shared_geometry(case: _Case) -> None:
    ref = case.reference
    ref_shape, ref_aff = case.arrays[ref].shape, case.affines[ref]
    for role in case.arrays:
        if case.arrays[role].shape != ref_shape:
            raise PreprocessError(
                f"roles do not share a grid: {role} has shape {case.arrays[role].shape}, {ref} {ref_shape}; "
                f"add a 'resample' transform to put them on one grid")
        diff = float(np.abs(case.affines[role] - ref_aff).max())
        if diff > GEOMETRY_ATOL:
            raise PreprocessError(
                f"roles do not share a grid: the affine of {role} differs from {ref}'s by {diff:.4g} "
                f"(tolerance {GEOMETRY_ATOL}); add a 'resample' transform or check the series")


def source_measurements(original: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Slice thickness, in-plane spacing and slice count of each role's source grid (the gate compares them).

    "Slice thickness" is the largest voxel size (the spacing between slices of
    a 2D series as NIfTI records it); the in-plane spacing the mean of the two
    others; the slice count is taken along the thickest axis.
    """
    out: dict[str, float] = {}
    for role, o in original.items():
        aff = np.asarray(o["affine"], dtype=np.float64)
        zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        # the thickest axis; among (near-)equal voxel sizes (an isotropic volume) the one with the fewest
        # voxels, so a 240x240x155 BraTS volume has 155 slices and a sagittal 176x256x256 MPRAGE 176
        top = [k for k in range(3) if zooms[k] >= zooms.max() * 0.999]
        thick = min(top, key=lambda k: (int(o["shape"][k]), k))
        others = [float(z) for k, z in enumerate(zooms) if k != thick]
        out[f"slice_thickness_mm/{role}"] = round(float(zooms[thick]), 3)
        out[f"inplane_spacing_mm/{role}"] = round(float(np.mean(others)), 3)
        out[f"slices/{role}"] = float(o["shape"][thick])
    return out


def apply_spec(spec: Mapping[str, Any], volumes: Mapping[str, VolumeInput], *,
               cache: MutableMapping[str, Any] | None = None) -> PreprocessedCase:
    """Prepare one case's volumes (by role) exactly as ``spec`` says.

    ``volumes[role]`` may be a nibabel image, a path to one, or ``(array,
    affine)``. Roles beyond the spec's are ignored (and recorded). Every
    missing role, unusable volume or geometry conflict raises
    :class:`PreprocessError`; a bad spec raises :class:`SpecError`.
    Deterministic: the same inputs give the same bytes.

    ``cache``: any mutable mapping (a dict, or one backed by files) in which
    the clinical transforms keep their expensive results (bias fields, masks,
    registrations) keyed by the input's content and their parameters, so that
    several checkpoints' specs over one study pay for them once.
    ``meta["measurements"]`` holds what the gate compares (see
    :mod:`models.measures`).
    """
    spec = validate_spec(spec)
    roles = spec["roles"]
    missing = [r for r in roles if r not in volumes]
    if missing:
        raise PreprocessError(f"missing role(s) {missing}: the spec needs {roles}, got {sorted(volumes)}")
    arrays: dict[str, np.ndarray] = {}
    affines: dict[str, np.ndarray] = {}
    original: dict[str, Any] = {}
    declared: dict[str, int] = {}
    for role in roles:
        value = volumes[role]
        if isinstance(value, (str, os.PathLike)):
            value = nib.load(os.fspath(value))
        declared[role] = _declared_code(value)
        data, affine = _load_volume(role, value)
        bad = ~np.isfinite(data)
        if bad.any():
            data = np.where(bad, np.float32(0), data)
        arrays[role], affines[role] = data, affine
        original[role] = {"shape": list(data.shape), "affine": _aff_list(affine),
                          "axcodes": "".join(nio.aff2axcodes(affine)), "nonfinite_voxels": int(bad.sum())}
    case = _Case(arrays=arrays, affines=affines, reference=roles[0], cache=cache, declared=declared)
    case.measurements.update(source_measurements(original))
    steps: list[dict[str, Any]] = []
    shared = False
    for t in spec["transforms"]:
        tr = _TRANSFORMS[t["name"]]
        if not tr.geometric and not shared:
            _require_shared_geometry(case)
            shared = True
        steps.append({"name": t["name"], **tr.apply(case, t)})
        case.chain.append(t)
    if not shared:
        _require_shared_geometry(case)
    meta: dict[str, Any] = {
        "spec_version": spec["version"], "roles": roles, "original": original, "steps": steps,
        "ignored_roles": sorted(set(volumes) - set(roles)),
        "shape": list(case.arrays[roles[0]].shape), "affine": _aff_list(case.affine),
        "measurements": dict(case.measurements),
    }
    if case.meta.get("cache_hits"):
        meta["cache_hits"] = list(case.meta["cache_hits"])
    result = PreprocessedCase(arrays={}, affine=case.affine.copy(), meta=meta, mask=case.mask,
                              template_mask=case.template_mask)
    if spec["slices"] is not None:
        arrays_2d, smask, sidx, smeta = _select_slices(case, spec["slices"])
        result.arrays = arrays_2d
        result.slice_mask, result.slice_indices = smask, sidx
        meta["slices"] = smeta
    else:
        result.arrays = {r: np.ascontiguousarray(case.arrays[r], dtype=np.float32) for r in roles}
    return result


def to_batch(cases: Sequence[PreprocessedCase], roles: Sequence[str]) -> dict[str, torch.Tensor]:
    """Stack cases into a family's ``predict`` inputs: role -> (B, ...) float32, plus ``slice_mask`` (B, S) bool.

    The slice mask is included when the cases carry one (slice specs); all
    cases must have the same shapes (they do when prepared by one spec).
    """
    if not cases:
        raise PreprocessError("to_batch: no cases")
    out: dict[str, torch.Tensor] = {}
    for role in roles:
        missing = [i for i, c in enumerate(cases) if role not in c.arrays]
        if missing:
            raise PreprocessError(f"to_batch: case(s) {missing} have no {role}")
        shapes = {c.arrays[role].shape for c in cases}
        if len(shapes) != 1:
            raise PreprocessError(f"to_batch: {role} arrays differ in shape across cases: {sorted(shapes)}")
        out[role] = torch.from_numpy(np.stack([c.arrays[role] for c in cases]).astype(np.float32, copy=False))
    with_mask = [c.slice_mask is not None for c in cases]
    if any(with_mask):
        if not all(with_mask):
            raise PreprocessError("to_batch: some cases have slices and some do not")
        masks = {c.slice_mask.shape for c in cases}  # type: ignore[union-attr]
        if len(masks) != 1:
            raise PreprocessError(f"to_batch: slice masks differ in shape: {sorted(masks)}")
        out["slice_mask"] = torch.from_numpy(np.stack([c.slice_mask for c in cases]).astype(bool))  # type: ignore[misc]
    return out
