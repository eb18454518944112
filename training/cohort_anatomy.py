"""Brain anatomy for the synthetic cohort: the MNI152 2009 template's tissue maps, varied per case.

Why the MNI template and not a procedural phantom: a network that learns on
ellipsoids learns ellipsoids; the template has real gyri, sulci, ventricles,
deep grey matter and cerebellum, so the tumour has to be found in a brain that
looks like one. It ships inside nilearn's wheel (GM and WM probability maps
and a brain mask at 1 mm), so nothing is downloaded. CSF is the brain mask
minus GM and WM (ventricles and sulci included); there is no CSF map to ship.

Per case the template is moved a little (scale, rotation, translation), bent
by a smooth random warp, and pushed outward around the tumour (mass effect),
then sampled on the output grid in world coordinates. All fields here are
numpy/scipy only and deterministic given the random generator passed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from scipy import ndimage

F32 = npt.NDArray[np.float32]

#: tumour site classes (crude MNI-coordinate lobes; enough for location preferences)
LOBES: tuple[str, ...] = ("frontal", "temporal", "parietal", "occipital", "insular")


@dataclass(frozen=True)
class Anatomy:
    """Template tissue maps (cropped to the brain, pre-smoothed for one output spacing)."""

    gm: F32
    wm: F32
    mask: F32
    vox_to_world: npt.NDArray[np.float64]
    world_to_vox: npt.NDArray[np.float64]
    brain_centre: npt.NDArray[np.float64]  # mm (MNI), centre of the brain mask's bounding box
    candidates: npt.NDArray[np.float64]  # (N, 3) mm (MNI): white-matter points a tumour may centre on
    candidate_lobe: npt.NDArray[np.int64]  # (N,) index into LOBES
    candidate_depth: npt.NDArray[np.float64]  # (N,) mm from the brain surface


@dataclass(frozen=True)
class Grid:
    """The output grid: shape, spacing and a BraTS-like affine (LPS voxel axes, centred on the brain)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: npt.NDArray[np.float64]

    @classmethod
    def around(cls, centre: npt.NDArray[np.float64], shape: tuple[int, int, int],
               spacing: tuple[float, float, float]) -> Grid:
        """BraTS volumes have affine ``diag(-1, -1, 1)``-like axes: i runs right->left, j anterior->posterior."""
        a = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        half = (np.asarray(shape, float) - 1) / 2
        a[:3, 3] = np.asarray(centre, float) - a[:3, :3] @ half
        shp = (int(shape[0]), int(shape[1]), int(shape[2]))
        spc = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        return cls(shape=shp, spacing=spc, affine=a)

    def world(self) -> F32:
        """(3, *shape) float32 world coordinates (mm) of every voxel centre."""
        idx = np.indices(self.shape, dtype=np.float32)
        a = self.affine.astype(np.float32)
        return (np.tensordot(a[:3, :3], idx, axes=1) + a[:3, 3, None, None, None]).astype(np.float32)


def _load_template() -> tuple[F32, F32, F32, npt.NDArray[np.float64]]:
    """GM, WM and brain mask of nilearn's MNI152 2009 template at 1 mm, and their affine."""
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a training dependency
        raise RuntimeError("the synthetic cohort needs nilearn (it ships the MNI152 template)") from exc
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    gm = np.asarray(gm_img.get_fdata(), dtype=np.float32)
    wm = np.asarray(wm_img.get_fdata(), dtype=np.float32)
    mask = np.asarray(mask_img.get_fdata(), dtype=np.float32)
    return gm, wm, mask, np.asarray(mask_img.affine, dtype=float)


def _lobe(p: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Crude lobe per MNI point (x right, y anterior, z superior): enough for site preferences."""
    x, y, z = np.abs(p[:, 0]), p[:, 1], p[:, 2]
    lobe = np.full(len(p), LOBES.index("parietal"), dtype=np.int64)
    lobe[y > -10] = LOBES.index("frontal")
    lobe[(z < 8) & (y < 15) & (y > -60) & (x > 28)] = LOBES.index("temporal")
    lobe[y < -62] = LOBES.index("occipital")
    lobe[(x > 25) & (x < 42) & (y > -15) & (y < 20) & (z > -8) & (z < 18)] = LOBES.index("insular")
    return lobe


@lru_cache(maxsize=1)
def _template() -> tuple[F32, F32, F32, npt.NDArray[np.float64]]:
    return _load_template()


@lru_cache(maxsize=4)
def load_anatomy(spacing: tuple[float, float, float]) -> Anatomy:
    """The template, cropped to the brain (+8 mm) and smoothed to the output ``spacing``.

    Why smooth first: sampling a 1 mm map at 3 mm with linear interpolation
    aliases (cortex flickers in and out); a Gaussian with the spacing's
    extra width makes each output voxel a partial-volume average. Cached per
    spacing, since every case of a cohort shares it.
    """
    gm, wm, mask, aff = _template()
    idx = np.argwhere(mask > 0.5)
    lo = np.maximum(idx.min(0) - 8, 0)
    hi = np.minimum(idx.max(0) + 9, mask.shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    gm, wm, mask = gm[sl].copy(), wm[sl].copy(), mask[sl].copy()
    inside = mask > 0.5
    v2w = aff.copy()
    v2w[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    src_mm = np.abs(np.diag(aff)[:3])
    # candidate tumour centres: white matter of the cerebrum (gliomas in adults are
    # mostly supratentorial), off the midline, on a 3 mm lattice, with their depth
    depth = ndimage.distance_transform_edt(inside, sampling=src_mm)
    lattice = np.zeros_like(inside)
    lattice[::3, ::3, ::3] = True
    vox = np.argwhere(lattice & (wm > 0.6) & inside)
    world = (v2w[:3, :3] @ vox.T.astype(float)).T + v2w[:3, 3]
    keep = (world[:, 2] > -12) & (np.abs(world[:, 0]) > 8) & (world[:, 1] > -95)
    vox, world = vox[keep], world[keep]
    cdepth = depth[tuple(vox.T)]
    centre_vox = (idx.min(0) + idx.max(0)) / 2.0
    centre = aff[:3, :3] @ centre_vox + aff[:3, 3]
    sigma = [math.sqrt(max(float(s) ** 2 - float(m) ** 2, 0.0)) / 2.355 / float(m) for s, m in zip(spacing, src_mm)]
    if max(sigma) > 0.05:
        gm = ndimage.gaussian_filter(gm, sigma).astype(np.float32)
        wm = ndimage.gaussian_filter(wm, sigma).astype(np.float32)
        mask = ndimage.gaussian_filter(mask, sigma).astype(np.float32)
    return Anatomy(gm=gm, wm=wm, mask=mask, vox_to_world=v2w, world_to_vox=np.linalg.inv(v2w),
                   brain_centre=centre, candidates=world, candidate_lobe=_lobe(world),
                   candidate_depth=np.asarray(cdepth, float))


# --------------------------------------------------------------------------- random fields
def smooth_noise(shape: tuple[int, ...], spacing: tuple[float, ...], feature_mm: float,
                 rng: np.random.Generator) -> F32:
    """A smooth Gaussian random field with unit variance and blobs about ``feature_mm`` across.

    Made on a coarse lattice (step feature/2), smoothed there, and linearly
    interpolated separably onto the grid: the cost is independent of the
    feature size, so a 90 mm bias field at 1 mm costs no more than a 4 mm texture.
    """
    step = feature_mm / 2.0
    coarse = [int(math.ceil(n * s / step)) + 4 for n, s in zip(shape, spacing)]
    w = rng.standard_normal(coarse).astype(np.float32)
    w = ndimage.gaussian_filter(w, 1.0, mode="wrap")
    w /= max(float(w.std()), 1e-6)
    offset = rng.uniform(0.0, 1.0, size=len(shape))
    out = w
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        x = 1.0 + offset[axis] + np.arange(n) * s / step
        i0 = np.floor(x).astype(np.int64)
        t = (x - i0).astype(np.float32)
        bshape = [1] * out.ndim
        bshape[axis] = n
        t = t.reshape(bshape)
        out = np.take(out, i0, axis=axis) * (1 - t) + np.take(out, i0 + 1, axis=axis) * t
    return np.ascontiguousarray(out, dtype=np.float32)


def rotation(angles_rad: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Rotation matrix from three angles (x, then y, then z)."""
    ax, ay, az = np.asarray(angles_rad, float)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class SubjectPose:
    """Where the subject's brain sits relative to the template: subject = c + t + R S (mni - c)."""

    scale: npt.NDArray[np.float64]
    rot: npt.NDArray[np.float64]
    shift: npt.NDArray[np.float64]

    def to_subject(self, mni: npt.NDArray[np.float64], centre: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return centre + self.shift + self.rot @ (self.scale * (np.asarray(mni, float) - centre))


def draw_pose(rng: np.random.Generator, scale_sd: float, rotation_sd_deg: float, shift_sd_mm: float) -> SubjectPose:
    """A subject's brain size and residual pose after BraTS-style rigid registration."""
    scale = np.clip(1.0 + rng.normal(0.0, scale_sd, 3) * np.array([1.0, 1.0, 0.8])
                    + rng.normal(0.0, scale_sd * 0.5), 0.82, 1.18)
    rot = rotation(np.deg2rad(rng.normal(0.0, rotation_sd_deg, 3)))
    shift = rng.normal(0.0, shift_sd_mm, 3)
    return SubjectPose(scale=scale, rot=rot, shift=shift)


def sample_brain(anat: Anatomy, grid: Grid, world: F32, pose: SubjectPose, rng: np.random.Generator, *,
                 warp_amplitude_mm: float, warp_feature_mm: float, mass_centre: npt.NDArray[np.float64],
                 mass_strength: float, mass_length_mm: float) -> tuple[F32, F32, F32, npt.NDArray[np.bool_]]:
    """GM, WM, CSF fractions (summing to 1 in the brain) and the brain mask on the output grid.

    The inverse map, output point -> template point, is: undo the mass effect
    (tissue near the tumour came from nearer its centre), add the smooth warp,
    undo the subject pose. The mass effect ``r_src = r (1 - m exp(-(r/L)^2))``
    is monotonic in ``r`` for ``m < 1``, so it never folds tissue.
    """
    q = world.copy()
    if mass_strength > 0:
        c = np.asarray(mass_centre, np.float32)[:, None, None, None]
        d = q - c
        r2 = np.einsum("i...,i...->...", d, d)
        q = c + d * (1.0 - np.float32(mass_strength) * np.exp(-r2 / np.float32(mass_length_mm ** 2)))
    if warp_amplitude_mm > 0:
        for axis in range(3):
            q[axis] += np.float32(warp_amplitude_mm) * smooth_noise(grid.shape, grid.spacing, warp_feature_mm, rng)
    centre = anat.brain_centre
    inv = np.linalg.inv(pose.rot @ np.diag(pose.scale))
    lin = anat.world_to_vox[:3, :3] @ inv
    off = anat.world_to_vox[:3, :3] @ (centre - inv @ (centre + pose.shift)) + anat.world_to_vox[:3, 3]
    vox = np.tensordot(lin.astype(np.float32), q, axes=1) + off.astype(np.float32)[:, None, None, None]
    del q
    kw = dict(order=1, mode="constant", cval=0.0, prefilter=False)
    mask_f = ndimage.map_coordinates(anat.mask, vox, **kw).astype(np.float32)
    gm = ndimage.map_coordinates(anat.gm, vox, **kw).astype(np.float32)
    wm = ndimage.map_coordinates(anat.wm, vox, **kw).astype(np.float32)
    mask = mask_f > 0.5
    tissue = gm + wm
    over = tissue > 1.0
    gm[over] /= tissue[over]
    wm[over] /= tissue[over]
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0).astype(np.float32)
    for a in (gm, wm, csf):
        a[~mask] = 0.0
    return gm, wm, csf, mask
