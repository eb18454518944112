"""Whole synthetic heads in native scanner geometry, around a skull-stripped brain with known truth.

Why: the cohort (:mod:`training.cohort`) is BraTS-like: skull-stripped, on one
1 mm-or-coarser grid in template space, every sequence co-registered. A
clinical study is none of that: a whole head (skull, scalp fat, eyes, neck),
each series on its own grid (3D 1 mm sagittal T1, 2D axial 5 mm T2 with
0.5 mm pixels, a tilted FLAIR), with a bias field and the patient not quite
straight in the coil. Brain extraction, registration and the input gate can
only be tested on such studies, and only synthetic ones come with the true
brain and tumour masks in every series' own grid. This module makes them.

Pieces:

* :class:`BrainCase`: a skull-stripped brain (role -> array, one affine), its
  brain mask and BraTS segmentation; :func:`load_brats_case` reads a
  BraTS-layout folder, :func:`synthetic_case` renders one cohort case in memory.
* :func:`make_head`: a procedural head around that brain, on the case's own
  voxel lattice extended to hold it (so the brain voxels are copied, never
  resampled): a subarachnoid CSF rim, skull (dark on every sequence, fatty
  marrow between the tables), scalp and subcutaneous fat (bright T1, medium
  T2/FLAIR), orbits with eyeballs (fluid: dark T1 and FLAIR, bright T2) in
  orbital fat, face, nose, maxillary sinuses, neck muscle with fat marbling,
  cervical spine and airway. Intensities are set per sequence from the brain's
  own median in that case (:data:`HEAD_CONTRAST`), so they are coherent with
  the brain whatever the site's gain.
* :class:`NativeGeometry` and :func:`geometry_preset`: the grid a scanner
  would acquire (plane, thickness, gap, pixel size, matrix, slices, tilt about
  the left-right axis, offset), with per-vendor presets ("3d", "2d", "mixed").
* :func:`native_study`: the head, moved by a small random pose, resampled into
  each role's native grid (thick slices average over the slice profile; they
  are not point samples), times a smooth bias field, plus Rician noise; with
  the true brain mask and segmentation on the same grid.
  :func:`swap_patient` puts one series of another patient into a study.

World coordinates are RAS millimetres (NIfTI); the brain is assumed upright
in them (as in MNI or SRI24 space: +y anterior, +z superior). Voxel arrays
follow the writer's layout (:mod:`dicomnode.synth.geometry`, not imported:
training never imports dicomnode): axis 0 runs along an image row, axis 1
down a column, axis 2 across slices, so ``write_study(..., planes=...)``
stores them without permuting. Everything is a pure function of its inputs
and seed; numpy/scipy only, linear interpolation (``affine_transform``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from .cohort_anatomy import rotation, smooth_noise
from .cohort_mri import CONTRAST, ROLES

__all__ = ["BrainCase", "HeadParams", "Head", "HeadPose", "NativeGeometry", "NativeSeries", "NativeStudy",
           "HEAD_LABELS", "HEAD_CONTRAST", "VENDORS", "STYLES", "load_brats_case", "synthetic_case",
           "make_head", "head_on_case_grid", "geometry_preset", "draw_pose", "resample_native",
           "native_study", "swap_patient"]

F32 = npt.NDArray[np.float32]

#: label values of :attr:`Head.labels`
HEAD_LABELS: dict[str, int] = {"background": 0, "brain": 1, "csf": 2, "bone": 3, "marrow": 4, "fat": 5,
                               "muscle": 6, "eye": 7, "air": 8}

#: signal of each head tissue per sequence, in the cohort's relative units (white matter
#: on T1 = 1, :data:`training.cohort_mri.CONTRAST`). Bone is dark on everything; fat is
#: bright on T1 and medium on (fast spin echo) T2 and FLAIR; the vitreous is fluid (CSF-like:
#: dark T1, bright T2, suppressed on FLAIR); muscle enhances a little after contrast.
HEAD_CONTRAST: dict[str, dict[str, float]] = {
    "T1": {"csf": 0.30, "bone": 0.03, "marrow": 0.80, "fat": 1.20, "muscle": 0.50, "eye": 0.22, "air": 0.0},
    "T1CE": {"csf": 0.32, "bone": 0.03, "marrow": 0.85, "fat": 1.20, "muscle": 0.60, "eye": 0.24, "air": 0.0},
    "T2": {"csf": 1.00, "bone": 0.03, "marrow": 0.55, "fat": 0.70, "muscle": 0.30, "eye": 1.05, "air": 0.0},
    "FLAIR": {"csf": 0.12, "bone": 0.03, "marrow": 0.50, "fat": 0.65, "muscle": 0.35, "eye": 0.10, "air": 0.0},
}
#: brain tissue mix used to turn a case's median brain intensity into the relative unit
_BRAIN_MIX = {"gm": 0.45, "wm": 0.40, "csf": 0.15}

VENDORS: tuple[str, ...] = ("siemens", "ge", "philips")
STYLES: tuple[str, ...] = ("mixed", "3d", "2d")

#: the writer's canonical (row direction, column direction) per plane, LPS (as dicomnode.synth.geometry.PLANES)
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "ax": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sag": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "cor": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
_RAS_LPS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- the brain
@dataclass(frozen=True)
class BrainCase:
    """A skull-stripped brain: volumes per role on one grid, its brain mask and tumour labels.

    ``volumes`` are 0 outside the brain (BraTS style); ``seg`` holds BraTS labels
    (1 necrosis / non-enhancing core, 2 oedema, 4 enhancing) or is None.
    """

    volumes: dict[str, np.ndarray]
    affine: np.ndarray
    brain_mask: npt.NDArray[np.bool_]
    seg: npt.NDArray[np.uint8] | None = None
    case_id: str = ""

    def __post_init__(self) -> None:
        if not self.volumes:
            raise ValueError("a brain case needs at least one volume")
        shape = self.brain_mask.shape
        for role, v in self.volumes.items():
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
            if v.shape != shape:
                raise ValueError(f"{role} has shape {v.shape}, the brain mask {shape}")
        if self.seg is not None and self.seg.shape != shape:
            raise ValueError(f"seg has shape {self.seg.shape}, the brain mask {shape}")
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError("affine must be 4x4")
        if not self.brain_mask.any():
            raise ValueError("the brain mask is empty")

    @property
    def spacing(self) -> tuple[float, float, float]:
        s = np.linalg.norm(np.asarray(self.affine, float)[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def brain_ml(self) -> float:
        """Volume of the brain mask (ml)."""
        return float(self.brain_mask.sum()) * float(np.prod(self.spacing)) / 1000.0


_BRATS_SUFFIX = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}


def _find(folder: Path, stem: str) -> Path | None:
    for ext in (".nii.gz", ".nii"):
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def load_brats_case(case_dir: str | Path) -> BrainCase:
    """Read ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]``; the brain mask is where any role is > 0.

    Roles whose file is missing are left out (at least one is needed); a missing seg gives ``seg=None``.
    """
    import nibabel as nib

    folder = Path(case_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    cid = folder.name
    vols: dict[str, np.ndarray] = {}
    affine: np.ndarray | None = None
    for role, suffix in _BRATS_SUFFIX.items():
        path = _find(folder, f"{cid}_{suffix}")
        if path is None:
            continue
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise ValueError(f"{path.name} is not 3-D (shape {data.shape})")
        if affine is None:
            affine = np.asarray(img.affine, float)
        elif not np.allclose(img.affine, affine, atol=1e-4):
            raise ValueError(f"{path.name} is not on the same grid as the other sequences")
        vols[role] = data
    if affine is None:
        raise FileNotFoundError(f"{folder} holds no {cid}_{{t1,t1ce,t2,flair}}.nii.gz (BraTS layout)")
    shapes = {v.shape for v in vols.values()}
    if len(shapes) != 1:
        raise ValueError(f"{cid}: sequences have different shapes {sorted(shapes)}")
    mask = np.zeros(next(iter(shapes)), bool)
    for v in vols.values():
        mask |= v > 0
    seg_path = _find(folder, f"{cid}_seg")
    seg = None if seg_path is None else np.asarray(nib.load(str(seg_path)).dataobj).astype(np.uint8)
    return BrainCase(volumes=vols, affine=affine, brain_mask=mask, seg=seg, case_id=cid)


def synthetic_case(seed: int = 0, grade: str = "HGG", profile: str = "small") -> BrainCase:
    """One case of the synthetic cohort, rendered in memory (no files): what
    ``generate_cohort(n_cases=1, seed=seed, hgg_fraction=1 or 0)`` writes for its case."""
    from .cohort import PROFILES, _Context, _render_case, plan_cohort
    from .cohort_anatomy import Grid, load_anatomy
    from .cohort_mri import draw_sites
    from .cohort_params import CohortParams

    if grade not in ("HGG", "LGG"):
        raise ValueError(f"grade must be HGG or LGG, not {grade!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    prof = PROFILES[profile]
    prm = CohortParams()
    anat = load_anatomy(prof.spacing)
    grid = Grid.around(anat.brain_centre, prof.shape, prof.spacing)
    plan = plan_cohort(1, int(seed), 1.0 if grade == "HGG" else 0.0, prm)[0]
    ctx = _Context(out_dir=Path("."), grid=grid, params=prm, seed=int(seed), sites=tuple(draw_sites(int(seed), prm)),
                   compresslevel=1)
    vols, seg, _row = _render_case(plan, ctx)
    mask = np.zeros(grid.shape, bool)
    for v in vols.values():
        mask |= v > 0
    return BrainCase(volumes={r: v.astype(np.float32) for r, v in vols.items()}, affine=grid.affine.copy(),
                     brain_mask=mask, seg=seg, case_id=f"synthetic-{grade}-{seed}")


# --------------------------------------------------------------------------- the head
@dataclass(frozen=True)
class HeadParams:
    """Sizes of the procedural head (mm) and how much texture it gets."""

    csf_mm: float = 2.5          # subarachnoid space outside the brain mask
    skull_mm: float = 6.5        # inner table + marrow + outer table
    scalp_mm: float = 6.0        # scalp (subcutaneous fat) over the skull
    skin_fat_mm: float = 4.0     # subcutaneous fat under the skin of face and neck
    neck_mm: float = 100.0       # how far the head grid reaches below the brain
    eye_radius_mm: float = 12.0
    texture: float = 0.04        # relative s.d. of the soft-tissue intensity texture
    smooth_brain_mm: float = 2.0  # the skull follows the brain smoothed by this much (no gyri in bone)


@dataclass(frozen=True)
class Head:
    """A head on the brain case's voxel lattice, extended to hold it.

    ``volumes`` are float32 in the case's intensity units; ``labels`` use
    :data:`HEAD_LABELS`; ``brain_mask``/``seg`` are the case's, padded.
    ``case_index`` is the head-grid index of the case's voxel (0, 0, 0)
    (negative where the case grid reaches past the head box).
    """

    volumes: dict[str, F32]
    affine: np.ndarray
    labels: npt.NDArray[np.uint8]
    brain_mask: npt.NDArray[np.bool_]
    seg: npt.NDArray[np.uint8]
    case_index: tuple[int, int, int]
    case_shape: tuple[int, int, int]
    brain_centre: npt.NDArray[np.float64]      # world mm: centre of the brain's bounding box
    scale: dict[str, float]                    # per role: case intensity of one relative unit (T1 WM = 1)
    landmarks: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    case_id: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def head_ml(self) -> float:
        """Volume of the whole head on this grid (every label but background), ml."""
        return float((self.labels > 0).sum()) * self.voxel_ml

    @property
    def brain_ml(self) -> float:
        return float(self.brain_mask.sum()) * self.voxel_ml

    def crop_to_case(self) -> Head:
        """The same head on exactly the case's grid (shape and affine of the input files)."""
        lo = np.asarray(self.case_index)
        sl = tuple(slice(int(a), int(a) + int(n)) for a, n in zip(lo, self.case_shape))
        if np.any(lo < 0) or any(s.stop > n for s, n in zip(sl, self.labels.shape)):
            raise ValueError("the case grid reaches outside the head grid")  # not produced by make_head
        shift = np.eye(4)
        shift[:3, 3] = lo
        return dataclasses.replace(
            self, volumes={r: v[sl].copy() for r, v in self.volumes.items()}, affine=self.affine @ shift,
            labels=self.labels[sl].copy(), brain_mask=self.brain_mask[sl].copy(), seg=self.seg[sl].copy(),
            case_index=(0, 0, 0))


def _ellipsoid(w: F32, centre: Sequence[float], radii: Sequence[float]) -> F32:
    """sum(((x - c) / r)^2): < 1 inside the ellipsoid."""
    out = np.zeros(w.shape[1:], np.float32)
    for a in range(3):
        out += ((w[a] - np.float32(centre[a])) / np.float32(radii[a])) ** 2
    return out


def _brain_scale(case: BrainCase) -> dict[str, float]:
    """Per role, the case intensity of one relative unit, from the median of normal brain."""
    normal = case.brain_mask if case.seg is None else case.brain_mask & (case.seg == 0)
    if not normal.any():
        normal = case.brain_mask
    out = {}
    for role, v in case.volumes.items():
        ref = sum(w * CONTRAST[role][t] for t, w in _BRAIN_MIX.items())
        med = float(np.median(v[normal]))
        if med <= 0:
            raise ValueError(f"{role}: the brain's median intensity is {med:g}; expected a positive MR signal")
        out[role] = med / ref
    return out


def make_head(case: BrainCase, *, seed: int = 0, params: HeadParams | None = None) -> Head:
    """A procedural head around ``case``'s brain (deterministic by seed).

    The head grid is the case's voxel lattice (same spacing and axes) with
    index ranges extended to hold the head down to ``params.neck_mm`` below
    the brain; the case's voxels are copied into it unchanged. Tissue layers
    follow the distance from the (smoothed) brain; the face, nose, orbits,
    neck and spine are ellipsoids and cylinders placed from the brain's
    bounding box and the lowest point of its frontal lobes.
    """
    p = params or HeadParams()
    a = np.asarray(case.affine, float)
    spacing = np.asarray(case.spacing)
    unit = a[:3, :3] / spacing
    if np.abs(unit.T @ unit - np.eye(3)).max() > 1e-4:
        raise ValueError("the case affine is sheared; a head needs orthogonal voxel axes")
    rng = np.random.default_rng([int(seed), 4271])

    # ---- brain landmarks (world mm)
    idx = np.argwhere(case.brain_mask)
    pts = idx @ a[:3, :3].T + a[:3, 3]
    lo, hi = pts.min(0), pts.max(0)
    centre = (lo + hi) / 2.0
    width = float(hi[0] - lo[0])
    z_front = float(pts[pts[:, 1] > hi[1] - 30.0, 2].min())
    shell = p.csf_mm + p.skull_mm + p.scalp_mm

    # ---- head grid: the case lattice, index range grown to the head box
    box_lo = lo - np.array([shell + 6.0, shell + 6.0, p.neck_mm])
    box_hi = hi + np.array([shell + 6.0, shell + 35.0, shell + 6.0])
    corners = np.array([[x, y, z] for x in (box_lo[0], box_hi[0]) for y in (box_lo[1], box_hi[1])
                        for z in (box_lo[2], box_hi[2])])
    ijk = (corners - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    ilo = np.minimum(np.floor(ijk.min(0)).astype(int), 0)
    ihi = np.maximum(np.ceil(ijk.max(0)).astype(int), np.asarray(case.brain_mask.shape) - 1)
    shape = tuple(int(v) for v in ihi - ilo + 1)
    shift = np.eye(4)
    shift[:3, 3] = ilo
    h_aff = a @ shift
    place = tuple(slice(int(-s), int(-s) + n) for s, n in zip(ilo, case.brain_mask.shape))
    brain = np.zeros(shape, bool)
    brain[place] = case.brain_mask
    seg = np.zeros(shape, np.uint8)
    if case.seg is not None:
        seg[place] = case.seg
    grid = np.indices(shape, dtype=np.float32)
    w = np.tensordot(h_aff[:3, :3].astype(np.float32), grid, axes=1) + h_aff[:3, 3].astype(np.float32)[:, None, None,
                                                                                                          None]
    del grid
    x, y, z = w[0], w[1], w[2]

    # ---- distances
    sig = [p.smooth_brain_mm / float(s) for s in spacing]
    envelope = ndimage.gaussian_filter(brain.astype(np.float32), sig) > 0.35
    envelope = ndimage.binary_fill_holes(envelope | brain)
    d_out = ndimage.distance_transform_edt(~envelope, sampling=spacing).astype(np.float32)

    # ---- shapes placed from the landmarks
    eye_r = p.eye_radius_mm
    z_eye = z_front - p.csf_mm - p.skull_mm - eye_r + 3.0
    y_eye = float(hi[1]) - 10.0
    eyes = [(float(centre[0]) + s * 0.22 * width, y_eye, z_eye) for s in (-1.0, 1.0)]
    y_neck = float(centre[1]) - 5.0
    face = _ellipsoid(w, (centre[0], hi[1] - 29.0, z_front - 40.0), (0.42 * width, 45.0, 55.0)) < 1
    nose = _ellipsoid(w, (centre[0], hi[1] + 14.0, z_eye - 22.0), (12.0, 16.0, 24.0)) < 1
    neck_r = (0.38 * width, 50.0)
    neck = ((((x - centre[0]) / neck_r[0]) ** 2 + ((y - y_neck) / neck_r[1]) ** 2) < 1) & (z < lo[2] + 40.0)
    union = (d_out <= shell) | face | nose | neck
    # fill the notches between the pieces (brow, cheeks, nape) as soft tissue does
    soft = union | (ndimage.gaussian_filter(union.astype(np.float32), [6.0 / float(s) for s in spacing]) > 0.4)
    depth = ndimage.distance_transform_edt(soft, sampling=spacing).astype(np.float32)

    lab = np.zeros(shape, np.uint8)
    L = HEAD_LABELS
    lab[soft] = L["muscle"]
    marbling = smooth_noise(shape, tuple(float(s) for s in spacing), 8.0, rng)
    lab[soft & (marbling > 1.3)] = L["fat"]  # intramuscular and deep fat
    lab[soft & ((depth <= p.skin_fat_mm) | ((d_out > p.csf_mm + p.skull_mm) & (d_out <= shell)))] = L["fat"]
    for c in eyes:
        lab[soft & (_ellipsoid(w, c, (eye_r + 5.0,) * 3) < 1)] = L["fat"]   # orbital fat
    for c in eyes:
        lab[soft & (_ellipsoid(w, c, (eye_r,) * 3) < 1)] = L["eye"]
    for sx in (-1.0, 1.0):  # maxillary sinuses
        lab[soft & (_ellipsoid(w, (centre[0] + sx * 0.17 * width, y_eye - 8.0, z_eye - 28.0), (11.0, 14.0, 14.0))
                    < 1)] = L["air"]
    y_air = y_neck + 0.45 * neck_r[1]
    lab[soft & ((x - centre[0]) ** 2 + (y - y_air) ** 2 < 64.0) & (z < z_front - 55.0)] = L["air"]  # airway
    y_spine = y_neck - 0.25 * neck_r[1]
    r_spine = (x - centre[0]) ** 2 + (y - y_spine) ** 2
    spine = soft & (z < lo[2] - 8.0)
    lab[spine & (r_spine < 100.0)] = L["bone"]
    lab[spine & (r_spine < 49.0)] = L["marrow"]
    bone = (d_out > p.csf_mm) & (d_out <= p.csf_mm + p.skull_mm)
    lab[bone] = L["bone"]
    lab[(d_out > p.csf_mm + 1.5) & (d_out <= p.csf_mm + p.skull_mm - 1.5)] = L["marrow"]
    lab[envelope | ((d_out > 0) & (d_out <= p.csf_mm))] = L["csf"]
    lab[brain] = L["brain"]
    del w, x, y, z

    # ---- intensities: a label lookup per role, a little partial volume and texture, the brain as it was
    scale = _brain_scale(case)
    tex = 1.0 + np.float32(p.texture) * smooth_noise(shape, tuple(float(s) for s in spacing), 6.0, rng)
    pv = [0.4 * min(1.0, 1.0 / float(s)) for s in spacing]
    volumes: dict[str, F32] = {}
    names = [n for n in L if n not in ("background", "brain")]
    for role, vol in case.volumes.items():
        lut = np.zeros(256, np.float32)
        for n in names:
            lut[L[n]] = HEAD_CONTRAST[role][n] * scale[role]
        lut[L["brain"]] = HEAD_CONTRAST[role]["csf"] * scale[role]  # what the brain edge blends with
        img = lut[lab]
        img = ndimage.gaussian_filter(img, pv) * tex
        img[lab == 0] = 0.0
        full = np.zeros(shape, np.float32)
        full[place] = vol
        volumes[role] = np.where(brain, full, img).astype(np.float32)

    marks = {"brain_centre": centre, "eye_left": np.asarray(eyes[1]), "eye_right": np.asarray(eyes[0])}
    if seg.any():
        marks["tumour_centroid"] = np.argwhere(seg > 0).mean(0) @ h_aff[:3, :3].T + h_aff[:3, 3]
    return Head(volumes=volumes, affine=h_aff, labels=lab, brain_mask=brain, seg=seg,
                case_index=tuple(int(v) for v in -ilo), case_shape=tuple(case.brain_mask.shape),
                brain_centre=centre, scale=scale, landmarks=marks, case_id=case.case_id)


def head_on_case_grid(case: BrainCase, *, seed: int = 0, params: HeadParams | None = None) -> Head:
    """The head of :func:`make_head` cropped to the case's own grid (same shape and affine as its files)."""
    return make_head(case, seed=seed, params=params).crop_to_case()


# --------------------------------------------------------------------------- native geometry
@dataclass(frozen=True)
class NativeGeometry:
    """The grid one series is acquired on, as a scanner plans it.

    ``plane``: "ax", "sag" or "cor" (image rows and columns as scanners store
    them, see dicomnode.synth.geometry.PLANES). ``inplane_mm``: pixel size
    (square, or (between rows, between columns) like PixelSpacing).
    ``matrix``: (rows, columns). Slices: ``n_slices``, or enough to cover
    ``coverage_mm``; slice centres are ``slice_thickness_mm + slice_gap_mm``
    apart. ``tilt_deg``: rotation of the whole stack about the left-right
    axis (right-hand rule about RAS +x: an axial stack's anterior edge goes
    up). ``translation_mm``: offset (RAS) of the field of view's centre from
    the brain's centre. ``acquisition``: "2D" or "3D" (MRAcquisitionType).
    """

    plane: str = "ax"
    slice_thickness_mm: float = 1.0
    slice_gap_mm: float = 0.0
    inplane_mm: float | tuple[float, float] = 1.0
    matrix: tuple[int, int] = (256, 256)
    n_slices: int | None = None
    coverage_mm: float | None = None
    tilt_deg: float = 0.0
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    acquisition: str = "3D"

    def __post_init__(self) -> None:
        # tuples, so a geometry is hashable (roles sharing one share their truth masks)
        object.__setattr__(self, "matrix", (int(self.matrix[0]), int(self.matrix[1])))
        object.__setattr__(self, "translation_mm", tuple(float(v) for v in self.translation_mm))
        if not isinstance(self.inplane_mm, (int, float)):
            object.__setattr__(self, "inplane_mm", (float(self.inplane_mm[0]), float(self.inplane_mm[1])))
        if self.plane not in _PLANES:
            raise ValueError(f"plane must be one of {', '.join(_PLANES)}, not {self.plane!r}")
        if self.slice_thickness_mm <= 0 or self.slice_gap_mm < 0:
            raise ValueError("slice thickness must be > 0 and the gap >= 0")
        if min(self.pixel_spacing) <= 0 or min(self.matrix) < 1:
            raise ValueError("pixel size and matrix must be positive")
        if (self.n_slices is None) == (self.coverage_mm is None):
            raise ValueError("give exactly one of n_slices and coverage_mm")
        if abs(self.tilt_deg) >= 45:
            raise ValueError("tilt must be below 45 degrees (beyond that it is another plane)")
        if self.acquisition not in ("2D", "3D"):
            raise ValueError("acquisition must be 2D or 3D")

    @property
    def slice_spacing_mm(self) -> float:
        return float(self.slice_thickness_mm + self.slice_gap_mm)

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """(between rows, between columns), like DICOM PixelSpacing."""
        if isinstance(self.inplane_mm, (int, float)):
            return (float(self.inplane_mm), float(self.inplane_mm))
        r, c = self.inplane_mm
        return (float(r), float(c))

    @property
    def slices(self) -> int:
        if self.n_slices is not None:
            return int(self.n_slices)
        return max(1, int(math.ceil(float(self.coverage_mm or 0.0) / self.slice_spacing_mm)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in the writer's voxel order: (columns, rows, slices)."""
        return (int(self.matrix[1]), int(self.matrix[0]), self.slices)

    def affine(self, centre: Sequence[float]) -> np.ndarray:
        """RAS affine of this grid with its field of view centred at ``centre`` + ``translation_mm``."""
        row_c, col_c = (np.asarray(v, float) for v in _PLANES[self.plane])
        tilt = rotation([math.radians(self.tilt_deg), 0.0, 0.0])
        # directions in RAS, then the tilt about RAS x
        r = tilt @ (_RAS_LPS @ row_c)
        c = tilt @ (_RAS_LPS @ col_c)
        n = _RAS_LPS @ np.cross(_RAS_LPS @ r, _RAS_LPS @ c)  # the writer's normal: row x column in LPS
        between_rows, between_cols = self.pixel_spacing
        m = np.column_stack([r * between_cols, c * between_rows, n * self.slice_spacing_mm])
        out = np.eye(4)
        out[:3, :3] = m
        half = (np.asarray(self.shape, float) - 1.0) / 2.0
        out[:3, 3] = np.asarray(centre, float) + np.asarray(self.translation_mm, float) - m @ half
        return out


def _g(plane: str, thick: float, inplane: float | tuple[float, float], matrix: tuple[int, int], n: int,
       gap: float = 0.0, tilt: float = 0.0, dz: float = 0.0, acq: str = "3D") -> NativeGeometry:
    return NativeGeometry(plane=plane, slice_thickness_mm=thick, slice_gap_mm=gap, inplane_mm=inplane,
                          matrix=matrix, n_slices=n, tilt_deg=tilt, translation_mm=(0.0, 0.0, dz), acquisition=acq)


#: per vendor: a 3D T1 (as its usual product sequence plans it), a 2D axial T2 and FLAIR
#: (5 mm, different pixel sizes and matrices; Siemens and Philips tilted as AC-PC
#: planning tilts them), and 2D axial T1 and 3D T2/FLAIR for the other styles
_VENDOR_GEOMETRY: dict[str, dict[str, NativeGeometry]] = {
    "siemens": {
        "T1_3d": _g("sag", 1.0, 1.0, (256, 240), 176, dz=-20.0),       # MPRAGE sagittal 1 mm
        "T2_3d": _g("sag", 1.0, 1.0, (256, 240), 176, dz=-20.0),       # SPACE
        "T1_2d": _g("ax", 5.0, 0.72, (320, 256), 30, gap=0.5, tilt=10.0, acq="2D"),
        "T2_2d": _g("ax", 5.0, 0.6, (384, 320), 30, gap=0.5, tilt=10.0, acq="2D"),
        "FLAIR_2d": _g("ax", 5.0, 0.9, (256, 216), 30, gap=0.5, tilt=10.0, acq="2D"),
    },
    "ge": {
        "T1_3d": _g("ax", 1.0, 0.9375, (256, 256), 176, dz=-15.0),     # BRAVO axial
        "T2_3d": _g("sag", 1.0, 1.0, (256, 256), 172, dz=-20.0),       # CUBE
        "T1_2d": _g("ax", 5.0, 0.86, (272, 232), 28, gap=1.0, acq="2D"),
        "T2_2d": _g("ax", 5.0, 0.55, (416, 352), 28, gap=1.0, acq="2D"),
        "FLAIR_2d": _g("ax", 5.0, 0.86, (272, 232), 28, gap=1.0, acq="2D"),
    },
    "philips": {
        "T1_3d": _g("sag", 1.0, 1.0, (240, 240), 180, dz=-15.0),       # 3D TFE sagittal
        "T2_3d": _g("sag", 1.0, 1.0, (240, 240), 180, dz=-15.0),       # VISTA
        "T1_2d": _g("ax", 5.0, 0.8, (288, 240), 28, gap=1.0, tilt=-8.0, acq="2D"),
        "T2_2d": _g("ax", 5.0, 0.6, (384, 312), 28, gap=1.0, tilt=-8.0, acq="2D"),
        "FLAIR_2d": _g("ax", 5.0, 0.75, (304, 256), 28, gap=1.0, tilt=-8.0, acq="2D"),
    },
}


def geometry_preset(vendor: str = "siemens", style: str = "mixed") -> dict[str, NativeGeometry]:
    """Native geometry per role for a vendor's usual brain-tumour protocol.

    ``style``: "mixed" (3D 1 mm T1 and T1CE, 2D 5 mm axial T2 and FLAIR: the
    common clinical protocol), "3d" (every role 3D 1 mm) or "2d" (every
    role 2D 5 mm axial). Within a style the vendors differ in plane, pixel
    size, matrix, gap and tilt (see the table in docs/synth.md).
    """
    v = vendor.lower()
    if v not in _VENDOR_GEOMETRY:
        raise ValueError(f"vendor must be one of {', '.join(VENDORS)}, not {vendor!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    g = _VENDOR_GEOMETRY[v]
    if style == "3d":
        return {"T1": g["T1_3d"], "T1CE": g["T1_3d"], "T2": g["T2_3d"], "FLAIR": g["T2_3d"]}
    if style == "2d":
        return {"T1": g["T1_2d"], "T1CE": g["T1_2d"], "T2": g["T2_2d"], "FLAIR": g["FLAIR_2d"]}
    return {"T1": g["T1_3d"], "T1CE": g["T1_3d"], "T2": g["T2_2d"], "FLAIR": g["FLAIR_2d"]}


# --------------------------------------------------------------------------- pose and resampling
@dataclass(frozen=True)
class HeadPose:
    """Where the head sits in the scanner: scanner = R (head - centre) + centre + t (world mm)."""

    rotation: np.ndarray
    translation: np.ndarray
    centre: np.ndarray

    @property
    def matrix(self) -> np.ndarray:
        """4x4: head world -> scanner world."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.centre + self.translation - self.rotation @ self.centre
        return m

    def apply(self, points: npt.ArrayLike) -> np.ndarray:
        """Head-world points (..., 3) -> scanner-world points."""
        pts = np.asarray(points, float)
        return (pts - self.centre) @ self.rotation.T + self.centre + self.translation

    @classmethod
    def identity(cls, centre: npt.ArrayLike = (0.0, 0.0, 0.0)) -> HeadPose:
        return cls(np.eye(3), np.zeros(3), np.asarray(centre, float))


def draw_pose(seed: int, centre: npt.ArrayLike, rotation_sd_deg: float = 3.0,
              translation_sd_mm: float = 4.0) -> HeadPose:
    """A study's small random head pose (rotation about the brain centre, then a shift), clipped at 2.5 s.d."""
    rng = np.random.default_rng([int(seed), 8117])
    ang = np.clip(rng.normal(0.0, rotation_sd_deg, 3), -2.5 * rotation_sd_deg, 2.5 * rotation_sd_deg)
    t = np.clip(rng.normal(0.0, translation_sd_mm, 3), -2.5 * translation_sd_mm, 2.5 * translation_sd_mm)
    return HeadPose(rotation(np.deg2rad(ang)), t, np.asarray(centre, float))


def _profile_offsets(geom: NativeGeometry, source_spacing: Sequence[float]) -> np.ndarray:
    """Sub-slice positions (in slice-index units) averaged for one slice: a box profile over the thickness."""
    step = max(0.75 * min(float(s) for s in source_spacing), 1.0)
    k = max(1, int(math.ceil(geom.slice_thickness_mm / step - 1e-6)))
    if k == 1:
        return np.zeros(1)
    mm = ((np.arange(k) + 0.5) / k - 0.5) * geom.slice_thickness_mm
    return mm / geom.slice_spacing_mm


def _region(t: np.ndarray, src_lo: np.ndarray, src_hi: np.ndarray, shape: Sequence[int],
            k_pad: float) -> tuple[np.ndarray, np.ndarray]:
    """Output index box [lo, hi) holding every output voxel that can see the source box [src_lo, src_hi]."""
    inv = np.linalg.inv(t)
    corners = np.array([[a, b, c, 1.0] for a in (src_lo[0] - 1, src_hi[0] + 1) for b in (src_lo[1] - 1, src_hi[1] + 1)
                        for c in (src_lo[2] - 1, src_hi[2] + 1)])
    out = (corners @ inv.T)[:, :3]
    pad = np.array([1.0, 1.0, 1.0 + k_pad])
    lo = np.clip(np.floor(out.min(0) - pad), 0, shape).astype(int)
    hi = np.clip(np.ceil(out.max(0) + pad) + 1, 0, shape).astype(int)
    return lo, np.maximum(hi, lo)


def _sample(src: np.ndarray, t: np.ndarray, shape: Sequence[int], offsets: np.ndarray, order: int = 1,
            region: tuple[np.ndarray, np.ndarray] | None = None) -> F32:
    """Mean over ``offsets`` of ``src`` sampled at output voxels (+ offset along axis 2); zero outside ``region``."""
    lo, hi = (np.zeros(3, int), np.asarray(shape, int)) if region is None else region
    out = np.zeros(tuple(int(v) for v in shape), np.float32)
    sub_shape = tuple(int(v) for v in hi - lo)
    if min(sub_shape) <= 0:
        return out
    m = t[:3, :3]
    acc = np.zeros(sub_shape, np.float32)
    for d in offsets:
        start = lo.astype(float) + np.array([0.0, 0.0, float(d)])
        acc += ndimage.affine_transform(src, m, offset=t[:3, 3] + m @ start, output_shape=sub_shape, order=order,
                                        mode="constant", cval=0.0, prefilter=False, output=np.float32)
    if len(offsets) > 1:
        acc /= np.float32(len(offsets))
    out[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))] = acc
    return out


def resample_native(volume: np.ndarray, affine: np.ndarray, geometry: NativeGeometry, centre: Sequence[float],
                    pose: HeadPose | None = None, order: int = 1) -> tuple[F32, np.ndarray]:
    """Any volume (RAS ``affine``) as ``geometry`` acquires it: ``(array, native affine)``.

    The volume is first moved by ``pose`` (head world -> scanner world); each
    output slice is the mean of sub-slices spread over its thickness (a box
    slice profile, 1 mm or 3/4 of the source's voxel apart), so a 5 mm
    slice holds 5 mm of anatomy, not a 1 mm sample of it.
    """
    src = np.asarray(volume, np.float32)
    naff = geometry.affine(centre)
    pose_m = np.eye(4) if pose is None else pose.matrix
    t = np.linalg.inv(np.asarray(affine, float)) @ np.linalg.inv(pose_m) @ naff
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    return _sample(src, t, geometry.shape, _profile_offsets(geometry, spacing), order=order), naff


# --------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class NativeSeries:
    """One role as its scanner stored it, with the truth on the same grid.

    ``volume`` is int16 in the writer's voxel order (columns, rows, slices);
    ``affine`` is its RAS affine; ``brain_mask`` marks voxels at least half
    brain; ``seg`` holds the BraTS label that fills most of the voxel's
    tumour part where the tumour fills at least half of it. Roles acquired
    on the same geometry share these truth arrays (the same objects).
    """

    role: str
    volume: npt.NDArray[np.int16]
    affine: np.ndarray
    brain_mask: npt.NDArray[np.bool_]
    seg: npt.NDArray[np.uint8]
    geometry: NativeGeometry
    head_mask: npt.NDArray[np.bool_] | None = None
    case_id: str = ""

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(np.linalg.norm(self.affine[:3, :3], axis=0))) / 1000.0

    @property
    def brain_ml(self) -> float:
        return float(self.brain_mask.sum()) * self.voxel_ml


@dataclass(frozen=True)
class NativeStudy:
    """A whole-head study: one :class:`NativeSeries` per role, the head pose, where each series came from."""

    series: dict[str, NativeSeries]
    pose: HeadPose
    case_id: str
    seed: int
    vendor: str
    sources: dict[str, str] = field(default_factory=dict)  # role -> case id (differs after swap_patient)

    @property
    def volumes(self) -> dict[str, np.ndarray]:
        return {r: s.volume for r, s in self.series.items()}

    @property
    def affines(self) -> dict[str, np.ndarray]:
        return {r: s.affine for r, s in self.series.items()}

    def writer_args(self) -> dict[str, Any]:
        """Keyword arguments for ``dicomnode.synth.write_study`` (volumes, per-role affines, planes,
        slice thickness, acquisition type); add ``out_dir``, ``vendor`` and the rest."""
        return {"volumes": self.volumes, "affine": self.affines,
                "planes": {r: s.geometry.plane for r, s in self.series.items()},
                "slice_thickness": {r: s.geometry.slice_thickness_mm for r, s in self.series.items()},
                "acquisition_types": {r: s.geometry.acquisition for r, s in self.series.items()}}


def _role_seed(seed: int, role: str) -> list[int]:
    return [int(seed), 6007, ROLES.index(role)]


def _bias(shape: Sequence[int], spacing: Sequence[float], amplitude: float, rng: np.random.Generator) -> F32:
    """A smooth multiplicative field, min..max exactly 1 -/+ amplitude/2 over the field of view.

    A sum of three separable products of smooth 1-D random curves (about
    140 mm features): smooth in every direction, not axis-aligned in look,
    and made in one pass per term instead of interpolating a 3-D lattice
    onto ten million voxels.
    """
    shp = tuple(int(v) for v in shape)
    f = np.zeros(shp, np.float32)
    for _ in range(3):
        cx, cy, cz = (smooth_noise((n,), (float(s),), 140.0, rng) for n, s in zip(shp, spacing))
        f += (cx[:, None] * cy[None, :])[:, :, None] * cz[None, None, :]
    lo, hi = float(f.min()), float(f.max())
    f -= np.float32(lo)
    f *= np.float32(amplitude / max(hi - lo, 1e-6))
    f += np.float32(1.0 - amplitude / 2.0)
    return f


def _truth(head: Head, t: np.ndarray, shape: tuple[int, int, int], offs: np.ndarray, k_pad: float,
           head_f: F32 | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Brain mask, segmentation and (optionally) head mask on one native grid.

    Each is the fraction of the voxel's slice profile a class fills: brain
    and head where >= 1/2; the tumour where its labels together fill >= 1/2,
    labelled with the one that fills most. Sampling is limited to the box
    each class can reach (the tumour's is small).
    """
    pos = np.argwhere(head.brain_mask)
    region = _region(t, pos.min(0), pos.max(0), shape, k_pad)
    brain = _sample(head.brain_mask.astype(np.float32), t, shape, offs, region=region) >= 0.5
    seg = np.zeros(shape, np.uint8)
    labels = [int(v) for v in np.unique(head.seg) if v > 0]
    if labels:
        pos = np.argwhere(head.seg > 0)
        region = _region(t, pos.min(0), pos.max(0), shape, k_pad)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(*region))
        any_t = _sample((head.seg > 0).astype(np.float32), t, shape, offs, region=region)[sl]
        frac = np.stack([_sample((head.seg == v).astype(np.float32), t, shape, offs, region=region)[sl]
                         for v in labels])
        lab = np.asarray(labels, np.uint8)[np.argmax(frac, axis=0)]
        seg[sl] = np.where(any_t >= 0.5, lab, 0)
    hm = None if head_f is None else _sample(head_f, t, shape, offs) >= 0.5
    return brain, seg, hm


def native_study(source: BrainCase | Head, geometries: Mapping[str, NativeGeometry] | str = "mixed", *,
                 vendor: str = "siemens", seed: int = 0, bias_amplitude: float = 0.2, noise: float = 0.02,
                 rotation_sd_deg: float = 3.0, translation_sd_mm: float = 4.0, head_mask: bool = False,
                 params: HeadParams | None = None) -> NativeStudy:
    """A whole-head study in native scanner geometry, deterministic by ``seed``.

    ``source``: a brain case (its head is made with ``seed`` and ``params``)
    or a ready :class:`Head`. ``geometries``: role -> geometry, or a style
    of :func:`geometry_preset` for ``vendor``; only roles the source has are
    made. Per study a head pose is drawn (``rotation_sd_deg`` about each axis,
    ``translation_sd_mm``); per role a bias field (peak-to-peak
    ``bias_amplitude``, relative) multiplies the signal, then Rician noise of
    s.d. ``noise`` relative units (T1 white matter = 1) is added everywhere,
    background included. ``head_mask=True`` also returns the head's mask per
    role (one more resampling each).
    """
    if not 0.0 <= bias_amplitude < 2.0:
        raise ValueError("bias_amplitude must be in [0, 2)")
    if noise < 0:
        raise ValueError("noise must be >= 0")
    head = source if isinstance(source, Head) else make_head(source, seed=seed, params=params)
    geoms = geometry_preset(vendor, geometries) if isinstance(geometries, str) else dict(geometries)
    roles = [r for r in ROLES if r in geoms and r in head.volumes]
    if not roles:
        raise ValueError(f"no role both in the geometries ({', '.join(geoms)}) and the source "
                         f"({', '.join(head.volumes)})")
    pose = draw_pose(seed, head.brain_centre, rotation_sd_deg, translation_sd_mm)
    pose_inv = np.linalg.inv(pose.matrix)
    h_inv = np.linalg.inv(head.affine)
    head_f = (head.labels > 0).astype(np.float32) if head_mask else None
    series: dict[str, NativeSeries] = {}
    truth: dict[NativeGeometry, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}  # roles sharing a grid
    for role in roles:
        g = geoms[role]
        naff = g.affine(head.brain_centre)
        t = h_inv @ pose_inv @ naff
        offs = _profile_offsets(g, head.spacing)
        k_pad = float(np.abs(offs).max())
        shape = g.shape
        rng = np.random.default_rng(_role_seed(seed, role))
        img = _sample(head.volumes[role], t, shape, offs)
        if bias_amplitude > 0:
            ps = g.pixel_spacing
            img *= _bias(shape, (ps[1], ps[0], g.slice_spacing_mm), bias_amplitude, rng)
        sigma = np.float32(noise * head.scale[role])
        if sigma > 0:
            n1 = rng.standard_normal(shape, dtype=np.float32)
            img += sigma * n1
            del n1
            n2 = rng.standard_normal(shape, dtype=np.float32)
            n2 *= sigma
            img = np.sqrt(img * img + n2 * n2)
            del n2
        vol = np.clip(np.rint(img), 0, 32767).astype(np.int16)
        del img
        if g not in truth:
            truth[g] = _truth(head, t, shape, offs, k_pad, head_f)
        brain, seg, hm = truth[g]
        series[role] = NativeSeries(role=role, volume=vol, affine=naff, brain_mask=brain, seg=seg, geometry=g,
                                    head_mask=hm, case_id=head.case_id)
    return NativeStudy(series=series, pose=pose, case_id=head.case_id, seed=int(seed), vendor=vendor,
                       sources={r: head.case_id for r in series})


def swap_patient(study: NativeStudy, donor: NativeStudy, role: str = "T1CE") -> NativeStudy:
    """``study`` with ``role`` replaced by ``donor``'s series: another patient's image in this study.

    For gate tests: the swapped series has its own head, pose and brain, so
    it registers badly to the others. ``sources`` records where each role came from.
    """
    if role not in study.series:
        raise ValueError(f"the study has no {role} series")
    if role not in donor.series:
        raise ValueError(f"the donor study has no {role} series")
    series = dict(study.series)
    series[role] = donor.series[role]
    sources = dict(study.sources)
    sources[role] = donor.sources.get(role, donor.case_id)
    return dataclasses.replace(study, series=series, sources=sources)
