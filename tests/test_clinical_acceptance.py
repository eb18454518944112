"""Acceptance of the clinical preprocessing and the gate (issue 10), at the models/training level.

Whole synthetic heads (``training.heads``) in the native geometry of three
vendors, written as DICOM (``dicomnode.synth.write_study``), converted as the
node converts (``dicomnode.stages.convert.convert_version``: dicom2nifti),
prepared with ``models.preprocess.clinical_volume_spec`` (N4, rigid
co-registration, deepbet, affine to nilearn's MNI152), and compared with the
truth they were built around. No mocks: every part is the one the node runs.
Run with ``pytest -s`` to see the figures (tables printed per test).

One cohort case serves every study (cost: 10-20 s of preparation per
two-role study on two loaded cores; the whole module about 4-5 minutes). It is drawn with the cohort's residual pose set
to zero (brain scale 1, no rotation, no shift): the cohort's anatomy is the
MNI152 template, so this case's BraTS-layout files really are in template
space, and "where the skull-stripped truth lands" (the same files prepared
with their template-space declaration, sform code 4: only resampled) is the
right reference for the registered whole heads. With the default residual
pose (scale s.d. 4 %, 3 degrees, 2 mm) the declared files sit up to ~5 mm
away from the template themselves (measured: a 4.9 mm centroid offset for a
case whose head registered correctly), which would test the declaration, not
the pipeline. The donors of other patients' series (the gate's test c) keep
the default pose: another patient is another size and position.

Studies in test 1 carry T1 and T1CE only: the two roles whose pixels decide
the brain mask (deepbet runs on the thinnest T1-weighted role, T1) and the
atlas affine (fitted on the reference role, T1CE); T2 and FLAIR would only
add their own N4 and rigid registration (about 10 s a study). The
four-role path, with T2/FLAIR registered onto T1CE, is test 3's.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from clinical_util import (ROLES4, Prepared, Table, brats_files, carry, centroid_mm, cohort_cases, correlation, dice,
                           prepare, write_and_convert)
from conftest import REAL_DATA, need
from models.gate import GateSettings, case_measurements, check_measurements
from models.preprocess import clinical_volume_spec
from training.heads import VENDORS, Head, NativeStudy, geometry_preset, load_brats_case, make_head, native_study, \
    swap_patient

pytestmark = pytest.mark.slow

STUDY_ROLES: tuple[str, ...] = ("T1", "T1CE")
STYLES: tuple[str, ...] = ("3d", "2d")
#: final grid of test 1 and 2: 2 mm (deepbet still runs at 1 mm on the mask role; the atlas step samples
#: every role once onto this grid); a 160 x 192 x 160 mm window around the template brain
SPACING_MM: float = 2.0
SHAPE: tuple[int, int, int] = (80, 96, 80)
CASE_SEED: int = 3
ZERO_POSE: dict[str, float] = {"brain_scale_sd": 0.0, "rotation_sd_deg": 0.0, "translation_sd_mm": 0.0}
#: the cohort case on a 2 mm lattice (192 x 192 x 156 mm): 5 s to render, and the heads built on it are
#: sampled onto the scanners' 0.55-1 mm grids like any continuous object
CASE_SHAPE: tuple[int, int, int] = (96, 96, 78)
CASE_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)

DICE_MIN = 0.90
CENTROID_MAX_MM = 5.0
CORRELATION_MIN = 0.90


def _spec(roles: tuple[str, ...] = STUDY_ROLES) -> dict[str, Any]:
    return clinical_volume_spec(roles, SHAPE, spacing=(SPACING_MM,) * 3)


@dataclasses.dataclass
class Study:
    """One whole-head study through DICOM and the clinical spec, with its truth."""

    name: str
    vendor: str
    style: str
    native: NativeStudy
    head: Head
    prepared: Prepared
    seconds: dict[str, Any]  # native_s, write_s, convert_s, prepare_s; converter

    def truth_on_final_grid(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` (a head-lattice mask) carried onto the prepared case's grid through the pipeline's
        own affine ``A``: final voxel -> template world -> (A) reference world = scanner world
        -> (pose^-1) head world -> head voxel. The series of one synthetic study share the scanner
        frame (one pose per study), so the reference role's world is the scanner's."""
        p = self.prepared
        m = np.linalg.inv(self.head.affine) @ np.linalg.inv(self.native.pose.matrix) @ p.atlas @ p.case.affine
        return carry(labels, m, p.case.mask.shape)  # type: ignore[union-attr]


def _make_study(head: Head, out: Path, *, vendor: str, style: str | dict, seed: int, spec: dict[str, Any],
                roles: tuple[str, ...] = STUDY_ROLES, native: NativeStudy | None = None,
                name: str | None = None) -> Study:
    t0 = time.perf_counter()
    if native is None:
        geoms = geometry_preset(vendor, style) if isinstance(style, str) else style
        native = native_study(head, {r: geoms[r] for r in roles}, vendor=vendor, seed=seed)
    t1 = time.perf_counter()
    args = native.writer_args()
    args = {k: {r: v[r] for r in roles} for k, v in args.items()}
    nifti, rw = write_and_convert(args, out, vendor=vendor, seed=seed)
    prepared = prepare(spec, nifti)
    style_name = style if isinstance(style, str) else "custom"
    return Study(name=name or f"{vendor}-{style_name}", vendor=vendor, style=style_name, native=native, head=head,
                 prepared=prepared, seconds={"native_s": t1 - t0, **rw, "prepare_s": prepared.seconds})


# --------------------------------------------------------------------------- shared (module) fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("clinical-acceptance")


@pytest.fixture(scope="module")
def case_dir(work: Path) -> Path:
    return cohort_cases(work / "cohort", n_cases=1, seed=CASE_SEED, shape=CASE_SHAPE, spacing=CASE_SPACING,
                        params=ZERO_POSE)[0]


@pytest.fixture(scope="module")
def head(case_dir: Path) -> Head:
    return make_head(load_brats_case(case_dir), seed=CASE_SEED)


@pytest.fixture(scope="module")
def studies(head: Head, work: Path) -> dict[tuple[str, str], Study]:
    """Six studies of the one case: three vendors' protocols, 3D (1 mm) and 2D (5 mm axial) each, each with
    its own head pose (seed), through DICOM and the clinical spec."""
    spec = _spec()
    out: dict[tuple[str, str], Study] = {}
    table = Table("test 1 studies: seconds per step (2 loaded cores)",
                  ["study", "T1 grid", "slices", "converter", "native", "write", "convert", "prepare"])
    for k, (vendor, style) in enumerate((v, s) for v in VENDORS for s in STYLES):
        st = _make_study(head, work / f"{vendor}-{style}", vendor=vendor, style=style, seed=100 + k, spec=spec)
        out[(vendor, style)] = st
        g = st.native.series["T1"].geometry
        table.add(st.name, f"{g.plane} {g.slice_thickness_mm:g}+{g.slice_gap_mm:g} mm, {g.inplane_mm} mm px",
                  g.slices, st.seconds["converter"],
                  *(st.seconds[k] for k in ("native_s", "write_s", "convert_s", "prepare_s")))
    table.add("total", "", "", "", *(sum(s.seconds[k] for s in out.values())
                                 for k in ("native_s", "write_s", "convert_s", "prepare_s")))
    table.show()
    return out


@pytest.fixture(scope="module")
def brats_reference(case_dir: Path) -> Prepared:
    """The same case from its BraTS-layout files (skull-stripped, declared MNI): only resampled."""
    ref = prepare(_spec(), brats_files(case_dir, STUDY_ROLES))
    assert ref.steps["atlas_register"]["registered"] is False
    assert ref.steps["brain_extract"]["method"] == "nonzero"
    return ref


# --------------------------------------------------------------------------- 1. brain mask and tumour position


def test_brain_mask_dice_against_truth(studies: dict[tuple[str, str], Study]) -> None:
    """deepbet's mask, on the final grid, against the TRUE brain carried there by the pipeline's own affine.

    Where to compare: on the final grid, because that mask is what the models and the
    normalisation use. The truth is carried with the same affine A the images were
    (template -> reference world), so an error of the atlas registration moves both masks alike
    and cancels: the Dice measures the brain extraction (and the co-registration of the mask role
    onto the reference), not the atlas fit, which the centroid test measures. The Dice on deepbet's
    own grid (the mask role's world resampled to 1 mm, where the mask is made, truth carried by the
    head pose alone) is printed beside it: the two agree when carrying the mask costs nothing.
    """
    table = Table("test 1a: brain mask Dice vs truth", ["study", "mask role", "deepbet ml", "true ml",
                                                          "Dice final grid", "Dice deepbet grid"])
    failures = []
    for st in studies.values():
        p = st.prepared
        assert p.steps["brain_extract"]["method"] == "deepbet", p.steps["brain_extract"]
        assert p.steps["atlas_register"]["registered"] is True
        assert p.case.mask is not None and p.brain is not None
        truth = st.truth_on_final_grid(st.head.brain_mask)
        d_final = dice(truth, p.case.mask)
        mask, mask_aff = p.brain
        native_truth = carry(st.head.brain_mask, np.linalg.inv(st.head.affine) @ np.linalg.inv(st.native.pose.matrix)
                             @ mask_aff, mask.shape)
        d_native = dice(native_truth, mask)
        table.add(st.name, p.steps["brain_extract"]["role"], p.measurements["brain_volume_ml"], st.head.brain_ml,
                  d_final, d_native)
        if d_final < DICE_MIN:
            failures.append((st.name, round(d_final, 3)))
    table.show()
    assert not failures, f"brain-mask Dice below {DICE_MIN}: {failures}"


def test_tumour_lands_where_the_skull_stripped_truth_does(studies: dict[tuple[str, str], Study],
                                                           brats_reference: Prepared, case_dir: Path) -> None:
    """After atlas registration the true tumour (carried like the images) sits within 5 mm of where the
    same case's BraTS-layout files put it (skull-stripped, declared MNI, only resampled)."""
    brain = load_brats_case(case_dir)
    assert brain.seg is not None
    ref = brats_reference
    ref_seg = carry(brain.seg > 0, np.linalg.inv(brain.affine) @ ref.case.affine, ref.case.mask.shape)  # type: ignore
    target = centroid_mm(ref_seg, ref.case.affine)
    table = Table(f"test 1b: tumour centroid vs the declared-MNI truth at {np.round(target, 1)} mm",
                  ["study", "centroid (template mm)", "distance mm", "atlas_scale", "atlas_mi", "atlas_dice"])
    failures = []
    for st in studies.values():
        p = st.prepared
        seg = st.truth_on_final_grid(st.head.seg > 0)
        c = centroid_mm(seg, p.case.affine)
        dist = float(np.linalg.norm(c - target))
        m = p.measurements
        table.add(st.name, str(np.round(c, 1)), dist, m["atlas_scale"], m["atlas_mi"], m["atlas_dice"])
        if dist > CENTROID_MAX_MM:
            failures.append((st.name, round(dist, 2)))
    table.show()
    assert not failures, f"tumour centroid further than {CENTROID_MAX_MM} mm: {failures}"


# --------------------------------------------------------------------------- 2. the gate declines


#: what a non-brain series is declined on (what deepbet's blob measures)
NON_BRAIN = {"brain_volume_ml", "atlas_mi", "atlas_dice", "atlas_scale", "template_coverage/T1",
             "template_coverage/T1CE"}
#: what another patient's series is declined on
REGISTRATION = ("coregister_mi/T1", "atlas_mi", "atlas_dice", "atlas_scale")


@pytest.fixture(scope="module")
def gate(studies: dict[tuple[str, str], Study]) -> dict[str, Any]:
    """A checkpoint's ``extra["gate"]`` as ``training.export`` records it, over training-like cases: the
    three 1 mm 3D whole-head studies of test 1 prepared with the same clinical spec (slice thickness
    1.0-1.0 mm). No features: these checks are the measurement ones."""
    from training.export import gate_record

    measured = [case_measurements(studies[(v, "3d")].prepared.case.meta) for v in VENDORS]
    record = gate_record(measured)
    table = Table(f"test 2 gate: ranges over {record['n_cases']} 3D studies (node margin 25 %)",
                  ["measurement", "low", "high", "allowed from", "allowed to"])
    from models.gate import allowed_interval
    from models.measures import MEASURES, split

    for name, (lo, hi) in record["ranges"].items():
        a, b = allowed_interval(lo, hi, GateSettings().margin, MEASURES[split(name)[0]].direction)
        table.add(name, lo, hi, a, b)
    table.show()
    return record


def _findings_table(title: str, findings: list) -> None:
    t = Table(title, ["measurement", "value", "training range", "reason"])
    for f in findings:
        t.add(f.name, f.value, f"{f.low}-{f.high}", f.reason)
    t.show()


def test_gate_control_accepts_an_unseen_vendor(studies: dict[tuple[str, str], Study]) -> None:
    """Control: a gate fitted on two vendors' 3D studies lets the third vendor's 3D study through on every
    measurement the declines below rely on (brain volume, atlas fit, coverage, co-registration), so
    those declines are about the series, not about any study the gate has not seen.

    Not asserted, printed: the intensity spread. Two studies of ONE patient give it a range only
    0.001 wide (the 10 % floor then allows +-0.006 at 0.24), and GE's 0.94 mm 3D T1CE measures
    0.229 against 0.239-0.240 for the other two: a real training set of many patients and sites has
    a much wider range.
    """
    from training.export import gate_record

    for held_out in VENDORS:
        g = gate_record([case_measurements(studies[(v, "3d")].prepared.case.meta) for v in VENDORS if v != held_out])
        findings = check_measurements(g, case_measurements(studies[(held_out, "3d")].prepared.case.meta),
                                      GateSettings())
        _findings_table(f"test 2 control: {held_out}-3d against a gate of the other two vendors", findings)
        relied_on = NON_BRAIN | set(REGISTRATION) | {n for n in g["ranges"] if n.startswith("slice_thickness_mm/")}
        assert not [f.reason for f in findings if f.name in relied_on]


def test_gate_declines_thick_slices(studies: dict[tuple[str, str], Study], gate: dict[str, Any]) -> None:
    """(a) The GE 2D study (5 mm slices, 1 mm gap: 6 mm from slice to slice, the voxel size the gate measures
    as slice thickness) against a gate trained on 1.0-1.0 mm: declined, naming the slice thickness."""
    st = studies[("ge", "2d")]
    findings = check_measurements(gate, case_measurements(st.prepared.case.meta), GateSettings())
    _findings_table(f"test 2a: {st.name} against the 3D gate", findings)
    for role in STUDY_ROLES:
        f = next((f for f in findings if f.name == f"slice_thickness_mm/{role}"), None)
        assert f is not None, [x.reason for x in findings]
        assert f.value == pytest.approx(6.0, abs=0.01) and f.low == f.high == pytest.approx(1.0)
        assert "6.0 mm" in f.reason and "1.0–1.0 mm" in f.reason, f.reason


def test_gate_declines_a_neck_series_labelled_brain(head: Head, work: Path, gate: dict[str, Any]) -> None:
    """(b) A synthetic non-brain series: 16 axial 5 mm slices of the same head's neck (the field of view
    125 mm below the brain's centre, no brain in it) sent as T1 and T1CE. deepbet still returns a blob;
    the gate declines on what that blob measures."""
    g = dataclasses.replace(geometry_preset("siemens", "2d")["T1"], n_slices=16, tilt_deg=0.0,
                            translation_mm=(0.0, 0.0, -125.0))
    st = _make_study(head, work / "neck", vendor="siemens", style={"T1": g, "T1CE": g}, seed=7, spec=_spec(),
                     name="siemens-neck")
    assert st.native.series["T1"].brain_ml < 1.0  # truly no brain in view
    findings = check_measurements(gate, case_measurements(st.prepared.case.meta), GateSettings())
    _findings_table(f"test 2b: neck series labelled T1/T1CE (deepbet found "
                    f"{st.prepared.measurements['brain_volume_ml']:.0f} ml; prepare {st.seconds['prepare_s']:.1f} s)",
                    findings)
    assert {f.name for f in findings} & NON_BRAIN, [f.reason for f in findings]


def test_gate_declines_the_real_shoulder_series(work: Path, gate: dict[str, Any]) -> None:
    """(b) The real Hitachi shoulder series (4 oblique spin-echo slices) labelled as T1 and T1CE, converted as
    the node converts it: declined with a named measurement (brain volume, atlas fit, coverage)."""
    import pydicom

    from dicomnode.stages.convert import convert_version

    src = REAL_DATA / "hitachi_echelon_SE_SHOULDER" / "dcm"
    need(src.is_dir(), f"{src} not present (the shared real data)")
    files = sorted(src.glob("*.dcm"))
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    converted = convert_version({"T1": (uid, files)}, work / "shoulder")["T1"]
    assert converted.ok, converted.error
    p = prepare(_spec(), {"T1": converted.nifti, "T1CE": converted.nifti})
    findings = check_measurements(gate, case_measurements(p.case.meta), GateSettings())
    _findings_table(f"test 2b: real shoulder as T1/T1CE (deepbet found {p.measurements['brain_volume_ml']:.0f} ml; "
                    f"prepare {p.seconds:.1f} s)", findings)
    assert {f.name for f in findings} & NON_BRAIN, [f.reason for f in findings]


def test_gate_declines_another_patients_t1ce(head: Head, work: Path, gate: dict[str, Any]) -> None:
    """(c) A Siemens 3D study whose T1CE is another patient's (another cohort case with the cohort's own
    size and pose, its own head): declined on the registration measurements. The control is the same
    study with the patient's own T1CE, on the same grid: only the patient differs.

    The T1CE grid is moved 5 mm off the T1's, so the rigid co-registration runs (on one shared grid
    the roles are taken as registered and it would not): the other patient is declined even after
    the registration has done its best. The mask is made on this patient's T1, the atlas affine is
    fitted on the T1CE, and ``coregister_mi/T1`` (T1 vs the reference T1CE inside the brain) no
    longer finds the same anatomy.
    """
    donor_dir = cohort_cases(work / "donors", n_cases=1, seed=CASE_SEED + 8, shape=CASE_SHAPE,
                             spacing=CASE_SPACING)[0]
    donor_head = make_head(load_brats_case(donor_dir), seed=CASE_SEED + 8)
    g = geometry_preset("siemens", "3d")
    moved = dataclasses.replace(g["T1CE"], translation_mm=(3.0, -2.0, g["T1CE"].translation_mm[2] + 3.0))
    geoms = {"T1": g["T1"], "T1CE": moved}
    mine = native_study(head, geoms, vendor="siemens", seed=CASE_SEED + 20)
    other = native_study(donor_head, {"T1CE": moved}, vendor="siemens", seed=CASE_SEED + 30)
    spec = _spec()
    same = _make_study(head, work / "own-t1ce", vendor="siemens", style="3d", seed=mine.seed, spec=spec,
                       native=mine, name="siemens-3d, own T1CE")
    swapped = _make_study(head, work / "swapped", vendor="siemens", style="3d", seed=mine.seed, spec=spec,
                          native=swap_patient(mine, other, "T1CE"), name="siemens-3d, T1CE of another patient")
    f_same = check_measurements(gate, case_measurements(same.prepared.case.meta), GateSettings())
    f_swap = check_measurements(gate, case_measurements(swapped.prepared.case.meta), GateSettings())
    t = Table("test 2c: own vs another patient's T1CE (T1CE grid 5 mm off the T1's)",
              ["measurement", "own T1CE", "other patient's T1CE", "training range"])
    for name in (*REGISTRATION, "brain_volume_ml"):
        t.add(name, same.prepared.measurements.get(name), swapped.prepared.measurements.get(name),
              str(gate["ranges"].get(name)))
    for st in (same, swapped):
        reg = st.prepared.steps["coregister"]["roles"]["T1"]
        t.add(f"T1 rigid ({st.name})", str({k: v for k, v in reg.items() if k != "why"}), "", "")
    t.show()
    _findings_table("test 2c: findings, own T1CE", f_same)
    _findings_table("test 2c: findings, another patient's T1CE", f_swap)
    assert same.prepared.steps["coregister"]["roles"]["T1"]["registered"] is True
    assert swapped.prepared.steps["coregister"]["roles"]["T1"]["registered"] is True
    assert not [f.reason for f in f_same if f.name in REGISTRATION]
    assert {f.name for f in f_swap} & set(REGISTRATION), [f.reason for f in f_swap]


# --------------------------------------------------------------------------- 3. train = serve


@pytest.fixture(scope="module")
def clinical_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fs3dcnn checkpoint of ``tests/checkpoints.py`` in its clinical variant: same cohort, steps and
    export (with the gate record), the family's spec turned clinical at its 6 mm spacing
    (``models.preprocess.clinical_variant``). Shared with any other test of the session that asks."""
    from checkpoints import tiny_checkpoints

    t0 = time.perf_counter()
    path = tiny_checkpoints(tmp_path_factory, ("fs3dcnn",), clinical=True) / "fs3dcnn-tiny.pt"
    print(f"\nclinical-spec fs3dcnn tiny checkpoint: {time.perf_counter() - t0:.1f} s")
    return path


def test_train_equals_serve(head: Head, case_dir: Path, work: Path, clinical_checkpoint: Path) -> None:
    """The case as training reads it (BraTS layout) and as a PACS sends it (a whole-head 4-sequence DICOM
    study, GE 3D protocol: axial T1/T1CE, sagittal T2/FLAIR registered onto T1CE), prepared with the
    checkpoint's clinical spec: the arrays agree inside the brain and the model grades both alike.

    "Inside the brain": the voxels both cases call brain, without their outer one-voxel (6 mm) layer.
    That layer is where the two inputs legitimately differ: the BraTS files are zero outside the
    brain, the head has a CSF rim, bone and fat there, and linear interpolation at the brain's edge
    mixes in what lies outside (bright CSF on T2). Both figures are printed.
    """
    import torch

    from models.checkpoint import load_checkpoint
    from models.preprocess import to_batch

    ck = load_checkpoint(clinical_checkpoint)
    spec = ck.spec
    assert [t["name"] for t in spec["transforms"]][:6] == ["reorient", "bias_field", "coregister", "brain_extract",
                                                          "atlas_register", "brain_mask"], spec
    served = _make_study(head, work / "serve-ge-3d", vendor="ge", style="3d", seed=CASE_SEED, spec=spec,
                         roles=ROLES4)
    trained = prepare(spec, brats_files(case_dir, ROLES4))
    s, b = served.prepared.case, trained.case
    assert s.mask is not None and b.mask is not None
    both = s.mask & b.mask
    interior = ndimage.binary_erosion(both)
    spacing = next(t["spacing"] for t in spec["transforms"] if t["name"] == "atlas_register")
    table = Table(f"test 3: BraTS layout vs whole-head DICOM ({served.name}), spec at {spacing} mm; "
                  f"prepare {served.seconds['prepare_s']:.1f} s",
                  ["role", "r interior", "r whole brain", "coregister", "coregister_mi served", "coregister_mi BraTS"])
    low = []
    for role in ROLES4:
        r_in = correlation(s.arrays[role], b.arrays[role], interior)
        r_all = correlation(s.arrays[role], b.arrays[role], both)
        reg = served.prepared.steps["coregister"]["roles"].get(role, {"reference": True})
        table.add(role, r_in, r_all, str({k: v for k, v in reg.items() if k != "why"}),
                  served.prepared.measurements.get(f"coregister_mi/{role}", math.nan),
                  trained.measurements.get(f"coregister_mi/{role}", math.nan))
        if r_in < CORRELATION_MIN:
            low.append((role, round(r_in, 3)))
    table.add("voxels", int(interior.sum()), int(both.sum()), "", "", "")
    table.show()

    fam = ck.family
    with torch.no_grad():
        probs = {name: fam.predict(ck.model, to_batch([c], fam.input_roles), saliency=False).probabilities["grade"][0]
                 for name, c in (("BraTS layout", b), ("whole-head DICOM", s))}
    labels = ck.labels["grade"]
    gate_t = Table("test 3: grade and the checkpoint's own gate", ["input", "P(grade)", "grade", "gate findings"])
    for name, c in (("BraTS layout", b), ("whole-head DICOM", s)):
        findings = check_measurements(ck.extra.get("gate"), case_measurements(c.meta), GateSettings())
        pr = probs[name]
        gate_t.add(name, str([round(float(v), 4) for v in pr]), labels[int(pr.argmax())],
                   "; ".join(f.reason for f in findings) or "none")
    gate_t.show()
    assert not low, f"correlation inside the brain below {CORRELATION_MIN}: {low}"
    assert int(probs["BraTS layout"].argmax()) == int(probs["whole-head DICOM"].argmax())
