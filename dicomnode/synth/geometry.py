"""Voxel geometry: NIfTI RAS affines to DICOM LPS slice stacks.

A volume comes in NIfTI voxel order ``(i, j, k)`` with a 4x4 affine that maps
voxel indices to RAS+ millimetres (what nibabel gives).  DICOM patient
coordinates are LPS+, so ``lps = diag(-1, -1, 1) @ ras``.

Before slicing, the volume's axes are permuted and flipped (never resampled)
so that the stored images look like what a scanner writes for the chosen
plane: axial images with rows running to the patient's left and columns to
posterior, sagittal with rows running posterior and columns inferior, and so
on.  In the reoriented volume ``w`` the DICOM pixel ``(row r, column c)`` of
slice ``k`` is ``w[c, r, k]``, so:

* ImageOrientationPatient = LPS direction of axis 0 (along a row), then of axis 1 (down a column)
* PixelSpacing = [spacing of axis 1 (between rows), spacing of axis 0 (between columns)]
* ImagePositionPatient of slice k = LPS position of voxel (0, 0, k)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

#: canonical (row direction, column direction) in LPS for each plane, as scanners store them
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "ax": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sag": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "cor": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

#: largest |cos| between two voxel axes still accepted as orthogonal
_ORTHO_TOL = 1e-4


@dataclass(frozen=True)
class SliceStack:
    """The DICOM geometry of a reoriented volume, one entry per slice."""

    pixels: np.ndarray            # (n_slices, rows, columns), same dtype as the input
    orientation: tuple[float, ...]  # ImageOrientationPatient, 6 values
    positions: np.ndarray         # (n_slices, 3) ImagePositionPatient, LPS mm
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slice_spacing: float          # distance between slice centres along the normal
    normal: np.ndarray            # row x column, unit vector (LPS)

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def slice_locations(self) -> np.ndarray:
        """SliceLocation: each slice position projected on the normal (mm)."""
        return self.positions @ self.normal


def check_affine(affine: np.ndarray) -> np.ndarray:
    """Return the affine as float64 4x4, or raise ValueError if DICOM cannot hold it."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("affine has non-finite values")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise ValueError("affine's last row must be [0, 0, 0, 1]")
    cols = a[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    unit = cols / norms
    gram = unit.T @ unit
    off = np.abs(gram - np.eye(3)).max()
    if off > _ORTHO_TOL:
        raise ValueError(
            f"affine voxel axes are not orthogonal (max |cos| {off:.2g}); "
            "a DICOM slice stack cannot represent shear"
        )
    return a


def reorient(volume: np.ndarray, affine: np.ndarray, plane: str) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the volume's axes (no resampling) to the plane's scanner layout.

    Returns ``(w, affine_w)`` where axis 0 of ``w`` runs along image rows, axis 1
    down image columns, axis 2 across slices (in increasing order along the
    slice normal), and ``affine_w`` is the RAS affine of ``w``.
    """
    a = check_affine(affine)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    row_c, col_c = (np.asarray(v) for v in PLANES[plane])
    normal_c = np.cross(row_c, col_c)
    lps = RAS_TO_LPS @ a[:3, :3]
    dirs = lps / np.linalg.norm(lps, axis=0)

    best: tuple[float, tuple[int, int, int]] | None = None
    for perm in itertools.permutations(range(3)):
        score = (abs(dirs[:, perm[0]] @ row_c) + abs(dirs[:, perm[1]] @ col_c)
                 + abs(dirs[:, perm[2]] @ normal_c))
        if best is None or score > best[0] + 1e-9:
            best = (score, perm)
    assert best is not None
    perm = best[1]
    targets = (row_c, col_c, normal_c)

    shape = volume.shape
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    w = np.transpose(volume, perm)
    for d in range(3):
        src = perm[d]
        flip = float(dirs[:, src] @ targets[d]) < 0
        if flip:
            w = np.flip(w, axis=d)
            t[src, d] = -1.0
            t[src, 3] = shape[src] - 1
        else:
            t[src, d] = 1.0
    return np.ascontiguousarray(w), a @ t


def slice_stack(volume: np.ndarray, affine: np.ndarray, plane: str = "ax") -> SliceStack:
    """Reorient for ``plane`` and compute every slice's DICOM geometry."""
    w, aw = reorient(volume, affine, plane)
    lps = RAS_TO_LPS @ aw[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    row_dir = lps[:, 0] / spacing[0]
    col_dir = lps[:, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    n = w.shape[2]
    idx = np.stack([np.zeros(n), np.zeros(n), np.arange(n), np.ones(n)])
    positions = (RAS_TO_LPS @ (aw @ idx)[:3]).T
    slice_spacing = float(abs(lps[:, 2] @ normal))
    pixels = np.ascontiguousarray(np.transpose(w, (2, 1, 0)))  # (k, row=j, column=i)
    return SliceStack(
        pixels=pixels,
        orientation=tuple(float(v) for v in (*row_dir, *col_dir)),
        positions=positions,
        pixel_spacing=(float(spacing[1]), float(spacing[0])),
        slice_spacing=slice_spacing,
        normal=normal,
    )


def rotation_affine(spacing=(1.0, 1.0, 1.0), shape=(1, 1, 1), degrees: float = 0.0,
                    axis: str = "z", flips=(1, 1, 1)) -> np.ndarray:
    """A RAS affine with the given spacing, centred on the origin, rotated about a world axis.

    ``flips`` multiplies the voxel axes (e.g. ``(-1, -1, 1)`` for the BraTS layout).
    Handy for tests and for writing oblique studies.
    """
    th = np.deg2rad(degrees)
    c, s = np.cos(th), np.sin(th)
    rot = {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]
    m = rot @ np.diag(np.asarray(spacing, float) * np.asarray(flips, float))
    a = np.eye(4)
    a[:3, :3] = m
    centre = (np.asarray(shape, float) - 1) / 2
    a[:3, 3] = -m @ centre
    return a
