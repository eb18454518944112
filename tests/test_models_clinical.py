"""Clinical transforms (models.clinical via models.preprocess): native heads to the template grid, measured.

Real parts: deepbet's networks from its wheel, SimpleITK registration, nilearn's
MNI152 template; the real Siemens head of ../shared/data/real when present.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import need
from models import clinical
from models.casefile import load_case, save_case
from models.measures import describe, format_value, label_of
from models.preprocess import (SpecError, apply_spec, clinical_slice_spec, clinical_volume_spec, is_clinical,
                               validate_spec)

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "real" / "siemens_prisma_brain_T1_FLAIR_HUMAN"
ARTIFACTS = Path(os.environ.get("DICOMNODE_TEST_ARTIFACTS", REPO / "out" / "test-artifacts"))


def _cohort_case(tmp: Path) -> dict[str, Path]:
    from training.cohort import generate_cohort

    out = tmp / "cohort"
    generate_cohort(out, n_cases=1, hgg_fraction=1.0, seed=3, shape=(64, 64, 48), spacing=(3.0, 3.0, 3.25),
                    workers=1)
    case = next(p for p in out.iterdir() if p.is_dir())
    return {r: case / f"{case.name}_{s}.nii.gz" for r, s in (("T1", "t1"), ("T1CE", "t1ce"), ("T2", "t2"),
                                                               ("FLAIR", "flair"))}


def test_spec_validation_orders_the_clinical_transforms() -> None:
    spec = clinical_volume_spec(["T1", "T2", "FLAIR"], [64, 64, 48], spacing=(3.0, 3.0, 3.25))
    assert is_clinical(spec)
    names = [t["name"] for t in spec["transforms"]]
    assert names == ["reorient", "bias_field", "coregister", "brain_extract", "atlas_register", "brain_mask",
                     "crop_or_pad", "normalize"]
    assert validate_spec(spec) == spec  # defaults explicit, stable
    bad = dict(spec, transforms=[t for t in spec["transforms"] if t["name"] != "brain_extract"])
    with pytest.raises(SpecError, match="brain_extract"):
        validate_spec(bad)
    both = dict(spec, transforms=[spec["transforms"][0], {"name": "resample", "spacing": [1, 1, 1]},
                                  *spec["transforms"][1:]])
    with pytest.raises(SpecError, match="resample"):
        validate_spec(both)
    with pytest.raises(SpecError, match="role"):
        validate_spec(dict(spec, transforms=[*spec["transforms"][:3],
                                             {"name": "brain_extract", "role": "KNEE"}, *spec["transforms"][4:]]))
    assert clinical_slice_spec(["T2", "FLAIR", "T1CE"], count=8, size=[32, 32], spacing=(6, 6, 6),
                               shape=(32, 32, 32))["slices"]["count"] == 8


def test_measures_vocabulary() -> None:
    assert label_of("slice_thickness_mm/T2") == "slice thickness (T2)"
    assert describe("slice_thickness_mm/T2").direction == "upper"
    assert format_value("brain_volume_ml", 1548.3) == "1,548 ml"
    assert format_value("atlas_mi", 0.612) == "0.61"


def test_mutual_information_orders_alignment() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 40, 40)).astype(np.float32)
    a = clinical.ndimage.gaussian_filter(a, 2)
    aligned = clinical.mutual_information(a, a * 2 + 1)
    shifted = clinical.mutual_information(a, np.roll(a, 6, axis=0))
    assert aligned > 1.0 > shifted


def test_skull_stripped_cohort_case_does_the_minimum(tmp_path: Path) -> None:
    """A BraTS-layout case (skull-stripped, one grid, MNI space declared): no deepbet, no registration, recorded."""
    vols = _cohort_case(tmp_path)
    spec = clinical_volume_spec(["T1", "T1CE", "T2", "FLAIR"], [64, 64, 48], spacing=(3.0, 3.0, 3.25))
    case = apply_spec(spec, vols)
    steps = {s["name"]: s for s in case.meta["steps"]}
    assert steps["brain_extract"]["method"] == "nonzero" and "skull-stripped" in steps["brain_extract"]["why"]
    assert steps["atlas_register"]["registered"] is False
    assert all(not r["registered"] for r in steps["coregister"]["roles"].values())
    m = case.meta["measurements"]
    assert 900 < m["brain_volume_ml"] < 2300
    assert m["slice_thickness_mm/T2"] == pytest.approx(3.25)
    assert m["atlas_dice"] > 0.8
    assert case.arrays["T1"].shape == (64, 64, 48)
    assert case.template_mask is not None and case.template_mask.shape == (64, 64, 48)
    assert not case.arrays["T1"][~case.mask].any()  # outside the brain is 0
    # the case file keeps the template mask and the measurements
    save_case(case, tmp_path / "c.npz")
    back = load_case(tmp_path / "c.npz")
    assert np.array_equal(back.template_mask, case.template_mask)
    assert back.meta["measurements"] == case.meta["measurements"]


def test_cache_reuses_expensive_results(tmp_path: Path) -> None:
    vols = _cohort_case(tmp_path)
    # as arrays without the declared space: registration runs, and is memoised
    arrays = {r: (nib.load(p).get_fdata(dtype=np.float32), nib.load(p).affine) for r, p in vols.items()}
    spec = clinical_volume_spec(["T1", "T2", "FLAIR"], [64, 64, 48], spacing=(3.0, 3.0, 3.25))
    cache: dict = {}
    first = apply_spec(spec, arrays, cache=cache)
    assert {s["name"]: s for s in first.meta["steps"]}["atlas_register"]["registered"] is True
    second = apply_spec(spec, arrays, cache=cache)
    assert "atlas_register" in second.meta["cache_hits"] and "bias_field" in second.meta["cache_hits"]
    for role in first.arrays:
        assert np.array_equal(first.arrays[role], second.arrays[role])
    # registered from the scanner frame, the brain still lands on the template brain
    assert first.meta["measurements"]["atlas_dice"] > 0.8


def test_real_siemens_head(tmp_path: Path) -> None:
    """The real MPRAGE + FLAIR head: deepbet mask 1,000-1,900 ml, FLAIR registered, a picture for a person."""
    need(REAL.is_dir(), f"{REAL} not present (skipped locally without ../shared, fails in CI)")
    need(shutil.which("dcm2niix") is not None, "dcm2niix (Debian package dcm2niix, installed by .ci/run)")
    subprocess.run(["dcm2niix", "-o", str(tmp_path), "-f", "%d", "-z", "n", str(REAL)], check=True,
                   capture_output=True)
    t1 = next(tmp_path.glob("MPRAGE*.nii"))
    flair = next(tmp_path.glob("*FLAIR*.nii"))
    spec = clinical_volume_spec(["T1", "FLAIR"], [160, 192, 160], spacing=(1.0, 1.0, 1.0))
    case = apply_spec(spec, {"T1": t1, "FLAIR": flair})
    m = case.meta["measurements"]
    steps = {s["name"]: s for s in case.meta["steps"]}
    assert steps["brain_extract"]["method"] == "deepbet"
    assert 1000 <= m["brain_volume_ml"] <= 1900, m
    assert steps["coregister"]["roles"]["FLAIR"]["registered"] is True
    assert m["coregister_mi/FLAIR"] > 0.2, m
    assert m["atlas_dice"] > 0.8, m
    assert m["slice_thickness_mm/FLAIR"] == pytest.approx(4.0, abs=0.01)
    # the brainstem below the template's window is not "the brain cut" (at most 2 % of the mask)
    assert steps["crop_or_pad"]["brain_truncated"] is False, steps["crop_or_pad"]["brain_cut_share"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    _outline_png(case, ARTIFACTS / "real_siemens_mask.png", m)


def _outline_png(case, path: Path, m: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, role in enumerate(("T1", "FLAIR")):
        img = case.arrays[role]
        for col, axis in enumerate((2, 1, 0)):
            k = img.shape[axis] // 2
            ax = axes[row, col]
            ax.imshow(np.take(img, k, axis=axis).T, origin="lower", cmap="gray")
            ax.contour(np.take(case.mask, k, axis=axis).T.astype(float), [0.5], colors="r", linewidths=0.8)
            ax.contour(np.take(case.template_mask, k, axis=axis).T.astype(float), [0.5], colors="c",
                       linewidths=0.8)
            ax.set_title(f"{role}, axis {axis}, slice {k}")
            ax.axis("off")
    fig.suptitle(f"brain mask (red) {m['brain_volume_ml']:,.0f} ml; template brain (cyan); "
                 f"atlas Dice {m['atlas_dice']:.2f}; FLAIR MI {m['coregister_mi/FLAIR']:.2f}")
    fig.savefig(path, dpi=70)
    plt.close(fig)
    assert path.stat().st_size > 10_000


def test_dir_cache_round_trip(tmp_path: Path) -> None:
    """The on-disk memo gives back what was stored (arrays exactly, numbers as floats); a torn file is a miss."""
    cache = clinical.DirCache(tmp_path / "memo")
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[1:3, 2:4, 3:5] = True
    cache["k" * 64] = (mask, np.eye(4) * 2.0)
    cache["m" * 64] = (np.ones((2, 2), dtype=np.float32), 0.25)
    got = cache["k" * 64]
    assert np.array_equal(got[0], mask) and got[0].dtype == bool and np.array_equal(got[1], np.eye(4) * 2.0)
    arr, number = cache["m" * 64]
    assert number == 0.25 and isinstance(number, float)
    assert "k" * 64 in cache and "x" * 64 not in cache
    (tmp_path / "memo" / ("m" * 32 + ".npz")).write_bytes(b"torn")
    with pytest.raises(KeyError):
        cache["m" * 64]


def test_clinical_variant_of_a_brats_spec() -> None:
    """Any family's BraTS-style spec turns into the clinical chain at the same spacing, crop and normalisation."""
    from models.preprocess import clinical_variant, slice_spec, volume_spec

    brats = volume_spec(["T1", "T2", "FLAIR"], [32, 32, 32], spacing=(6.0, 6.0, 6.0))
    clin = clinical_variant(brats)
    names = [t["name"] for t in clin["transforms"]]
    assert names == ["reorient", "bias_field", "coregister", "brain_extract", "atlas_register", "brain_mask",
                     "crop_or_pad", "normalize"]
    by = {t["name"]: t for t in clin["transforms"]}
    assert by["atlas_register"]["spacing"] == [6.0, 6.0, 6.0]
    assert by["crop_or_pad"]["shape"] == [32, 32, 32] and by["crop_or_pad"]["anchor"] == "template_brain_center"
    assert by["brain_mask"]["method"] == "extracted"
    assert clinical_variant(clin) == clin
    assert "bias_field" not in [t["name"] for t in clinical_variant(brats, bias_field=False)["transforms"]]
    sl = clinical_variant(slice_spec(["T2", "FLAIR", "T1CE"], count=8, size=(32, 32), spacing=(6, 6, 6),
                                     shape=(32, 32, 32)))
    assert is_clinical(sl) and sl["slices"]["count"] == 8
