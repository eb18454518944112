"""Helpers for the clinical acceptance tests (``tests/test_clinical_acceptance.py``): truth carried like the images.

Why a module: the acceptance tests compare what the clinical spec made of a
whole-head DICOM study with the synthetic truth the head was built around.
The truth (brain mask, tumour labels) lives on the head's own lattice, in the
head's world; the prepared case lives on the template grid. To compare them
the truth has to be carried onto the final grid through the SAME transform the
pipeline used for the images: the affine ``A`` (template world -> reference
world) that ``atlas_register`` found. ``apply_spec`` does not return its
transforms, but with ``cache=`` it memoises them (the expensive results,
keyed by content), so :func:`prepare` hands it a fresh dict and reads them
back out of it, checked against what ``meta`` records (``atlas_scale`` is
``|det A|^(1/3)``; the mask's volume is ``brain_volume_ml``).

Real parts only: ``dicomnode.synth.write_study`` writes the study, the node's
conversion stage (``dicomnode.stages.convert.convert_version``: dicom2nifti)
reads it back, ``models.preprocess.apply_spec`` prepares it (SimpleITK, deepbet,
nilearn's MNI152). Tests may import both sides of the house (dicomnode and
training); the layering rule binds the packages, not the tests.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from models.preprocess import PreprocessedCase, apply_spec

ROLES4: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR")
BRATS_SUFFIX: dict[str, str] = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}


# --------------------------------------------------------------------------- cohort cases on disk


def cohort_cases(out: Path, *, n_cases: int, seed: int, shape: tuple[int, int, int],
                 spacing: tuple[float, float, float], hgg_fraction: float = 1.0,
                 params: Mapping[str, Any] | None = None) -> list[Path]:
    """``n_cases`` synthetic cases in BraTS layout (``training.cohort``), their folders in order."""
    from training.cohort import generate_cohort

    if not (out / "cohort.json").exists():
        generate_cohort(out, n_cases=n_cases, hgg_fraction=hgg_fraction, seed=seed, shape=shape, spacing=spacing,
                        workers=1, overwrite=True, compresslevel=1, params=params)
    return sorted(p for p in out.iterdir() if p.is_dir())


def brats_files(case_dir: Path, roles: tuple[str, ...] = ROLES4) -> dict[str, Path]:
    """role -> ``<case>/<case>_<suffix>.nii.gz``: what training reads."""
    return {r: case_dir / f"{case_dir.name}_{BRATS_SUFFIX[r]}.nii.gz" for r in roles}


# --------------------------------------------------------------------------- DICOM round trip


def write_and_convert(writer_args: Mapping[str, Any], out: Path, *, vendor: str,
                      seed: int) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write a study as the vendor's scanner would (``write_study``), convert it as the node does.

    ``writer_args``: :meth:`training.heads.NativeStudy.writer_args` (volumes, per-role affines, planes,
    slice thickness, acquisition type). Returns role -> NIfTI path, and the seconds each half took with
    the converter that read the series back (``converter``: dicom2nifti unless it failed and dcm2niix ran).
    """
    from dicomnode.stages.convert import convert_version
    from dicomnode.synth import write_study

    args = dict(writer_args)
    t0 = time.perf_counter()
    written = write_study(**args, out_dir=out / "dicom", vendor=vendor, seed=seed)
    t1 = time.perf_counter()
    converted = convert_version({r: (written.series[r], written.files[r]) for r in written.series}, out / "nifti")
    t2 = time.perf_counter()
    bad = {r: c.error for r, c in converted.items() if not c.ok}
    if bad:
        raise AssertionError(f"conversion failed: {bad}")
    return ({r: Path(c.nifti) for r, c in converted.items()},  # type: ignore[arg-type]
            {"write_s": t1 - t0, "convert_s": t2 - t1,
             "converter": "/".join(sorted({str(c.converter) for c in converted.values()}))})


# --------------------------------------------------------------------------- prepared cases and their transforms


@dataclass
class Prepared:
    """A case after ``apply_spec`` with what the pipeline used inside it.

    ``atlas``: 4x4 RAS, template world -> reference role's world (identity when the input declared
    template space); ``brain``: (deepbet mask, its affine) on the mask role's 1 mm grid, None when
    the input was taken as skull-stripped; ``cache``: the memo (pass it again to reuse the work).
    """

    case: PreprocessedCase
    atlas: np.ndarray
    brain: tuple[np.ndarray, np.ndarray] | None
    cache: dict[str, Any]
    seconds: float

    @property
    def measurements(self) -> dict[str, float]:
        return dict(self.case.meta["measurements"])

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.case.meta["steps"]}


def _is_affine(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.shape == (4, 4)


def memo_transforms(cache: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[np.ndarray, tuple | None]:
    """(A, deepbet mask) read out of a FRESH memo filled by one ``apply_spec`` run, checked against ``meta``.

    The memo's values, in insertion order: bias fields ``(array, float)`` per role, rigid
    transforms ``(4x4, float)`` per registered role, the brain mask ``(bool array, 4x4)``, the
    atlas affine ``(4x4, float)``. The atlas affine is the one 4x4 entry after the mask (rigid
    ones come before it); it is checked against ``meta``'s ``atlas_scale``.
    """
    steps = {s["name"]: s for s in meta["steps"]}
    values = list(cache.values())
    mask_at = [i for i, v in enumerate(values) if isinstance(v, tuple) and len(v) == 2
               and isinstance(v[0], np.ndarray) and v[0].dtype == bool and v[0].ndim == 3 and _is_affine(v[1])]
    brain = None
    if steps["brain_extract"]["method"] == "deepbet":
        assert len(mask_at) == 1, f"expected one brain mask in the memo, found {len(mask_at)}"
        mask, aff = values[mask_at[0]]
        brain = (np.asarray(mask, bool), np.asarray(aff, np.float64))
        ml = float(brain[0].sum()) * float(abs(np.linalg.det(brain[1][:3, :3]))) / 1000.0
        assert abs(ml - meta["measurements"]["brain_volume_ml"]) < 0.2, (ml, meta["measurements"])
    if not steps["atlas_register"]["registered"]:
        return np.eye(4), brain
    after = values[mask_at[-1] + 1:] if mask_at else values
    found = [v[0] for v in after if isinstance(v, tuple) and len(v) == 2 and _is_affine(v[0])
             and isinstance(v[1], float)]
    assert len(found) == 1, f"expected one atlas affine in the memo after the mask, found {len(found)}"
    A = np.asarray(found[0], np.float64)
    scale = abs(float(np.linalg.det(A[:3, :3]))) ** (1.0 / 3.0)
    assert abs(scale - meta["measurements"]["atlas_scale"]) < 1e-3, (scale, meta["measurements"]["atlas_scale"])
    return A, brain


def prepare(spec: Mapping[str, Any], volumes: Mapping[str, Any],
            cache: MutableMapping[str, Any] | None = None) -> Prepared:
    """``apply_spec`` with a memo (a fresh one, or one filled by another spec over the SAME study only),
    plus the transforms it used."""
    memo: dict[str, Any] = {} if cache is None else cache  # type: ignore[assignment]
    t0 = time.perf_counter()
    case = apply_spec(spec, volumes, cache=memo)
    seconds = time.perf_counter() - t0
    # a memo reused by a second spec over the same study gains no entries (every result is a hit)
    A, brain = memo_transforms(memo, case.meta)
    return Prepared(case=case, atlas=A, brain=brain, cache=memo, seconds=seconds)


# --------------------------------------------------------------------------- carrying truth, comparing


def carry(volume: np.ndarray, vox_from_out: np.ndarray, shape: tuple[int, ...], *, labels: bool = False) -> np.ndarray:
    """``volume`` sampled on an output grid (``vox_from_out``: output index -> ``volume`` index).

    Masks: linear interpolation of the 0/1 mask, kept where >= 0.5 (as the pipeline carries its own
    mask). ``labels=True``: nearest neighbour (label values are not ordered).
    """
    src = np.asarray(volume, np.float32)
    out = ndimage.affine_transform(src, vox_from_out[:3, :3], offset=vox_from_out[:3, 3], output_shape=shape,
                                   order=0 if labels else 1, mode="constant", cval=0.0, prefilter=False)
    return out if labels else out >= 0.5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World (mm) centroid of a mask's voxels."""
    idx = np.argwhere(mask)
    assert len(idx), "empty mask"
    return idx.mean(0) @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Pearson correlation of two arrays over ``where``."""
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


@dataclass
class Table:
    """Rows printed as an aligned table (``pytest -s`` shows them; the lead quotes them)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def show(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
            return str(v)

        cells = [self.columns, *[[fmt(v) for v in r] for r in self.rows]]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [f"\n== {self.title}"]
        for k, r in enumerate(cells):
            lines.append("  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(r, widths)))
        text = "\n".join(lines)
        print(text, flush=True)
        return text
