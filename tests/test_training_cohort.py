"""training.cohort: the synthetic BraTS-like cohort: determinism, balance, layout, labels, image statistics."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.cases import ROLES
from training.cohort import (
    BRATS2020_HGG_FRACTION,
    PROFILES,
    CohortParams,
    generate_cohort,
    measure_effects,
    plan_cohort,
)
from training.datasets import read_brats2020

from conftest import need

try:
    import nilearn  # noqa: F401  - ships the MNI152 template the cohort's anatomy comes from
    HAVE_NILEARN = True
except ImportError:
    HAVE_NILEARN = False


@pytest.fixture(autouse=True)
def _nilearn() -> None:
    """Skip on a developer machine without nilearn; fail in CI (the project's rule for missing parts)."""
    need(HAVE_NILEARN, "nilearn not installed (the synthetic cohort's anatomy is its MNI152 template)")

# 48x48x36 at 4 mm: a whole brain, large enough for 4-5 mm enhancing rims, ~0.15 s a case
TEST_GRID = {"shape": (48, 48, 36), "spacing": (4.0, 4.0, 4.3)}
TINY_GRID = {"shape": (24, 24, 20), "spacing": (8.0, 8.0, 8.0)}
SUFFIX = {"T1": "t1", "T1CE": "t1ce", "T2": "t2", "FLAIR": "flair"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 balanced cases: enough for HGG-vs-LGG statistics, a few seconds on 2 cores."""
    need(HAVE_NILEARN, "nilearn not installed")
    out = tmp_path_factory.mktemp("cohort") / "synthetic"
    generate_cohort(out, n_cases=32, hgg_fraction=0.5, seed=0, workers=2, **TEST_GRID)
    return out


def _truth(root: Path) -> list[dict[str, str]]:
    with (root / "truth.csv").open() as fh:
        return list(csv.DictReader(fh))


def _load(root: Path, cid: str, suffix: str) -> np.ndarray:
    return np.asarray(nib.load(str(root / cid / f"{cid}_{suffix}.nii.gz")).dataobj)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = generate_cohort(tmp_path / "a", n_cases=3, seed=5, workers=1, **TINY_GRID)
    b = generate_cohort(tmp_path / "b", n_cases=3, seed=5, workers=2, **TINY_GRID)
    files_a = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 3 * 5 + 4
    for rel in files_a:
        assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    c = generate_cohort(tmp_path / "c", n_cases=3, seed=6, workers=1, **TINY_GRID)
    cid = "BraTS20_Training_001"
    assert not np.array_equal(_load(a.out_dir, cid, "t1"), _load(c.out_dir, cid, "t1"))
    assert a.to_dict() == b.to_dict()


# --------------------------------------------------------------------------- balance and labels
def test_class_balance_is_exact():
    plans = plan_cohort(369, seed=0)
    assert sum(p.grade == "HGG" for p in plans) == 293 and sum(p.grade == "LGG" for p in plans) == 76
    assert sum(p.grade == "HGG" for p in plan_cohort(100, seed=3)) == round(100 * BRATS2020_HGG_FRACTION) == 79
    assert {p.grade for p in plan_cohort(3, seed=0, hgg_fraction=0.99)} == {"HGG", "LGG"}  # both present
    assert [p.case_id for p in plan_cohort(3)] == [f"BraTS20_Training_00{i}" for i in (1, 2, 3)]
    assert plan_cohort(1000)[-1].case_id == "BraTS20_Training_1000"


def test_profiles():
    assert PROFILES["full"].n_cases == 369 and PROFILES["full"].shape == (240, 240, 155)
    assert PROFILES["full"].spacing == (1.0, 1.0, 1.0)
    small = PROFILES["small"]
    fov = np.multiply(small.shape, small.spacing)
    assert small.n_cases <= 100 and np.all(fov >= (190, 190, 150))  # the whole brain, coarsely


def test_molecular_label_correlations():
    plans = plan_cohort(6000, seed=1, hgg_fraction=0.5)
    hgg = [p for p in plans if p.grade == "HGG"]
    lgg = [p for p in plans if p.grade == "LGG"]
    p = CohortParams()
    assert all(pl.idh == 1 for pl in plans if pl.codel == 1)  # no codeletion in IDH-wildtype
    mut_lgg = np.mean([pl.idh for pl in lgg])
    mut_hgg = np.mean([pl.idh for pl in hgg])
    assert abs(mut_lgg - p.lgg.p_idh_mutant) < 0.03 and abs(mut_hgg - p.hgg.p_idh_mutant) < 0.03
    assert mut_lgg > 4 * mut_hgg  # IDH-mutant far more common in LGG
    codel_given_mut = np.mean([pl.codel for pl in lgg if pl.idh == 1])
    assert abs(codel_given_mut - p.lgg.p_codeleted_given_idh_mutant) < 0.04


def test_missing_molecular_labels_are_withheld_not_changed(tmp_path):
    plans = plan_cohort(400, seed=2, p=CohortParams().with_overrides({"p_missing_molecular": 0.3}))
    withheld = [pl for pl in plans if pl.idh_label is None]
    assert 80 < len(withheld) < 160
    assert all(pl.idh_label in (None, pl.idh) and pl.codel_label in (None, pl.codel) for pl in plans)


# --------------------------------------------------------------------------- layout
def test_layout_reads_as_brats2020_with_molecular_labels(cohort):
    cases = read_brats2020(cohort, require_seg=True)  # also checks every case's shapes and affines
    assert len(cases) == 32
    assert sum(c.labels["grade"] == 1 for c in cases) == 16
    assert all(c.roles == ROLES and c.labels["idh"] is not None and c.labels["1p19q"] is not None for c in cases)
    truth = {r["case_id"]: r for r in _truth(cohort)}
    for c in cases:
        t = truth[c.case_id]
        assert c.labels["grade"] == (t["grade"] == "HGG")
        assert (c.labels["idh"], c.labels["1p19q"]) == (int(t["idh"]), int(t["codel"]))
    with (cohort / "name_mapping.csv").open() as fh:
        assert next(csv.reader(fh)) == ["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID",
                                        "TCGA_TCIA_subject_ID", "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"]
    summary = json.loads((cohort / "cohort.json").read_text())
    assert summary["counts"]["grade"] == {"HGG": 16, "LGG": 16}
    assert summary["shape"] == [48, 48, 36] and summary["params"]["hgg"]["p_enhancing"] == 0.97
    img = nib.load(str(cases[0].images["T1"]))
    assert img.shape == (48, 48, 36) and img.get_data_dtype() == np.int16
    assert np.allclose(np.diag(img.affine)[:3], (-4.0, -4.0, 4.3))  # BraTS-like axes


def test_images_are_skull_stripped_and_coregistered(cohort):
    for cid in ("BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"):
        vols = {r: _load(cohort, cid, s) for r, s in SUFFIX.items()}
        seg = _load(cohort, cid, "seg")
        brain = vols["T1"] > 0
        for v in vols.values():
            assert (v < 0).sum() == 0
            assert np.mean((v > 0) != brain) < 1e-3  # one brain mask for every sequence
        assert 0.15 < brain.mean() < 0.6
        assert set(np.unique(seg)) <= {0, 1, 2, 4} and np.all(brain[seg > 0])
        assert (seg > 0).sum() > 0


def test_truth_follows_the_molecular_rules(cohort):
    for r in _truth(cohort):
        if r["codel"] == "1":
            assert r["idh"] == "1"
        if r["mismatch"] == "1":  # T2-FLAIR mismatch: IDH-mutant, 1p/19q intact only
            assert (r["idh"], r["codel"]) == ("1", "0")
        if r["enhancement_pattern"] == "ring":
            assert r["grade"] == "HGG" and r["necrosis"] == "1"


# --------------------------------------------------------------------------- statistics
def test_grade_strongest_on_t1ce_and_present_without_contrast(cohort):
    """Measured on the written images with the true tumour outline: T1CE carries the strongest
    single signs; the non-enhanced sequences carry a real grade signal too (the calibrated cohort:
    necrosis, pre-contrast rim and texture inside the tumour). How much harder it is for a network
    to learn without contrast is a property of the baseline rows (Table 1), not of these features."""
    rep = measure_effects(cohort)
    hgg, lgg = rep.grade == 1, rep.grade == 0
    enh = rep.features["t1ce_enhancing_fraction"]
    # strong: enhancing fraction within the tumour is far higher for HGG on T1CE
    assert enh[hgg].mean() > 10 * max(enh[lgg].mean(), 0.005)
    assert rep.feature_auc["t1ce_enhancing_fraction"] > 0.95
    assert rep.cohen_d["t1ce_tumour_p99"] > 2.5
    d_ce = max(abs(rep.cohen_d[f]) for f in rep.CE_FEATURES)
    d_ne = max(abs(rep.cohen_d[f]) for f in rep.NE_FEATURES)
    assert 0.5 < d_ne < d_ce
    assert rep.auc["NE"] > 0.8 and rep.auc["T1CE"] > 0.9
    # oedema extent keeps its literature-sized difference (the calibration knob does not scale it)
    assert rep.feature_auc["flair_abnormal_ml"] < 0.9
    assert "t1ce_enhancing_fraction" in rep.table()


def test_hgg_enhances_lgg_mostly_not(cohort):
    truth = _truth(cohort)
    hgg_enh = [float(r["enhancing_ml"]) > 0 for r in truth if r["grade"] == "HGG"]
    lgg_enh = [float(r["enhancing_ml"]) > 0 for r in truth if r["grade"] == "LGG"]
    assert np.mean(hgg_enh) >= 0.8 and np.mean(lgg_enh) <= 0.4


# --------------------------------------------------------------------------- parameters and safety
def test_params_overrides_are_checked_and_recorded(tmp_path):
    p = CohortParams().with_overrides({"hgg.edema_ratio_mean": 1.4, "n_sites": 2, "noise_range": [0.01, 0.02]})
    assert p.hgg.edema_ratio_mean == 1.4 and p.n_sites == 2 and p.noise_range == (0.01, 0.02)
    assert CohortParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown cohort parameter 'hgg.edema'"):
        CohortParams().with_overrides({"hgg.edema": 1.0})
    with pytest.raises(ValueError, match="unknown cohort parameter 'nosie_range'"):
        CohortParams().with_overrides({"nosie_range": (0, 1)})
    with pytest.raises(ValueError, match="p_enhancing must be in"):
        CohortParams().with_overrides({"lgg.p_enhancing": 1.5})
    s = generate_cohort(tmp_path / "c", n_cases=2, seed=0, workers=1, params={"lgg.p_enhancing": 0.0}, **TINY_GRID)
    assert json.loads((s.out_dir / "cohort.json").read_text())["params"]["lgg"]["p_enhancing"] == 0.0


def test_refuses_to_mix_or_clobber(tmp_path):
    out = tmp_path / "c"
    generate_cohort(out, n_cases=2, seed=0, workers=1, **TINY_GRID)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_cohort(out, n_cases=2, seed=1, workers=1, **TINY_GRID)
    s = generate_cohort(out, n_cases=1, seed=1, workers=1, overwrite=True, **TINY_GRID)
    assert s.n_cases == 1 and not (out / "BraTS20_Training_002").exists()
    (out / "my_notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a cohort's"):
        generate_cohort(out, n_cases=1, seed=1, workers=1, overwrite=True, **TINY_GRID)
    with pytest.raises(ValueError, match="profile"):
        generate_cohort(tmp_path / "d", profile="medium")


def test_a_case_becomes_a_dicom_study(cohort, tmp_path):
    """The node's study writer turns a cohort case into DICOM (how the node's tests and demo use it)."""
    synth = pytest.importorskip("dicomnode.synth")
    cid = "BraTS20_Training_004"
    img = nib.load(str(cohort / cid / f"{cid}_t1.nii.gz"))
    vols = {s: _load(cohort, cid, s) for s in SUFFIX.values()}
    study = synth.write_study(vols, img.affine, tmp_path / "study", vendor="ge", seed=0)
    assert set(study.files) == set(ROLES) and all(len(v) == 36 for v in study.files.values())


# --------------------------------------------------------------------------- the calibration knob
def test_ne_signal_scales_what_non_enhanced_sequences_show_of_the_tumour():
    base = CohortParams().with_overrides({"ne_signal": 1.0})
    p = CohortParams().with_overrides({"ne_signal": 3.0})
    e = p.effective()
    assert e.ne_signal == 1.0 and e.effective() == e
    assert e.necrosis_ne_contrast == pytest.approx(3.0 * base.necrosis_ne_contrast)
    assert e.rim_ne_contrast == pytest.approx(3.0 * base.rim_ne_contrast)
    lo, hi = base.lgg.heterogeneity_mean, base.hgg.heterogeneity_mean
    assert e.hgg.heterogeneity_mean == pytest.approx(lo + 3.0 * (hi - lo))
    assert e.lgg.heterogeneity_mean == lo  # LGG stays put
    # what only T1CE shows is not touched, nor oedema extent and margins (literature values)
    for name in ("p_enhancing", "enhancement_mean", "p_necrosis", "core_radius_median_mm", "edema_ratio_mean",
                 "irregularity"):
        assert getattr(e.hgg, name) == getattr(base.hgg, name) and getattr(e.lgg, name) == getattr(base.lgg, name)
    assert base.effective() == base
    with pytest.raises(ValueError, match="ne_signal must be in"):
        CohortParams().with_overrides({"ne_signal": -1})
    with pytest.raises(ValueError, match="necrosis_ne_contrast"):
        CohortParams().with_overrides({"ne_signal": 15.0}).effective()


def test_ne_signal_is_recorded_and_moves_what_the_images_carry(cohort, tmp_path):
    """The default (calibrated) cohort's non-enhanced sequences separate the grades better than
    ne_signal = 1 on the same seed, and still worse than T1CE: the situation PromptNet addresses."""
    info = json.loads((cohort / "cohort.json").read_text())
    assert info["params"]["ne_signal"] == CohortParams().ne_signal > 1.0
    assert info["effective_params"]["ne_signal"] == 1.0
    assert info["effective_params"]["necrosis_ne_contrast"] == pytest.approx(
        CohortParams().effective().necrosis_ne_contrast)
    weak = tmp_path / "weak"
    generate_cohort(weak, n_cases=32, hgg_fraction=0.5, seed=0, workers=2, params={"ne_signal": 1.0}, **TEST_GRID)
    strong_rep, weak_rep = measure_effects(cohort), measure_effects(weak)
    assert strong_rep.auc["NE"] > weak_rep.auc["NE"]
    assert strong_rep.auc["T1CE"] >= strong_rep.auc["NE"]
