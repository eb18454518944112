"""The report stage with real parts: synthetic DICOM studies, highdicom, dciodvfy, dcmtk's dsrdump/dsr2html."""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.handoff import (
    Decision,
    Declined,
    GateReason,
    InputSeries,
    KeySlice,
    ModelResult,
    SourceRef,
    Superseded,
    TaskResult,
    VersionResult,
)
import dicomnode.stages.report as report_stage
from dicomnode.stages.report import (
    SR_FILE,
    SUMMARY_FILE,
    build_sr,
    build_summary,
    describe,
    render_html,
    report_uids,
    summary_png,
    timed_write_reports,
    warm,
    write_reports,
)
from dicomnode.stages.report import codes
from dicomnode.stages.report.sop import read_example, sr_from_example
from dicomnode.stages.report.summary import HEIGHT, WIDTH, layout
from dicomnode.synth import make_phantom, write_study

from conftest import dcmtk_tool, need

WHEN = dt.datetime(2026, 3, 4, 10, 11, 12)
VERSION = "0.3.0-test"
SHA_A = "a1" * 32
SHA_B = "b2" * 32
PATIENT_NAME = "SYNTHETIC^GLIOMA"
PATIENT_ID = "SYN0001"


# --------------------------------------------------------------------------- helpers
def dciodvfy(path: Path) -> str:
    exe = shutil.which("dciodvfy")
    need(exe is not None, "dicom3tools dciodvfy not installed")
    done = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def assert_valid(path: Path) -> None:
    out = dciodvfy(path)
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    # the only warnings we accept: dciodvfy does not know our declared private scheme
    others = [line for line in out.splitlines()
              if line.startswith("Warning") and "99DCMNODE" not in line]
    assert not others, "\n".join(others)


def dsrdump(path: Path) -> str:
    done = subprocess.run([dcmtk_tool("dsrdump"), "+Pt", "+Pc", "+Pl", "+Pu", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def inputs_of(study, roles) -> list[InputSeries]:
    out = []
    for role in roles:
        refs = []
        for f in study.files[role]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if frames > 1:
                refs += [SourceRef(ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID, k)
                         for k in range(1, frames + 1)]
            else:
                refs.append(SourceRef(ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID))
        first = pydicom.dcmread(study.files[role][0], stop_before_pixels=True)
        out.append(InputSeries(role, study.series[role], int(first.SeriesNumber), str(first.SeriesDescription),
                               refs, str(study.files[role][0])))
    return out


def task(name: str, label: str, probs: dict[str, float], calibrated: bool = True) -> TaskResult:
    positive = list(probs)[1]
    return TaskResult(name, label, probs[positive], probs, calibrated)


def model(family: str, roles: list[str], tasks: list[TaskResult], sha: str = SHA_A,
          key_slices: list[KeySlice] | None = None, reason: str = "") -> ModelResult:
    return ModelResult(
        family=family, paper={"promptnet": "seed 000 (adaptive PromptNet)", "mmdlm": "seed 002 (MMDLM)"}[family],
        checkpoint_name=f"{family}-2026.ckpt", checkpoint_sha256=sha, checkpoint_created="2026-02-01T00:00:00Z",
        input_roles=roles, reason=reason or f"{family} runs on {'+'.join(roles)}.", tasks=tasks,
        key_slices=key_slices or [], training_data={"description": "BraTS2020 (synthetic stand-in)",
                                                    "train": {"n_cases": 295, "labels": {"grade": {"HGG": 234, "LGG": 61}}}},
        metrics={"test": {"auc": 0.912, "n": 74, "sensitivity": 0.9, "specificity": 0.8}}, device="cpu", seconds=1.5,
        quality_flags=["bias field strong in FLAIR"] if family == "promptnet" else [])


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    vols, affine = make_phantom(shape=(40, 40, 16), spacing=(5.0, 5.0, 8.0), seed=3, grade="HGG")
    return write_study(vols, affine, tmp_path_factory.mktemp("src"), vendor="siemens", seed=3,
                       patient_name=PATIENT_NAME, patient_id=PATIENT_ID)


@pytest.fixture(scope="module")
def enhanced_study(tmp_path_factory):
    vols, affine = make_phantom(shape=(40, 40, 16), spacing=(5.0, 5.0, 8.0), seed=4, grade="LGG")
    return write_study(vols, affine, tmp_path_factory.mktemp("enh"), vendor="philips", enhanced=True, seed=4,
                       roles=["T1CE", "T2", "FLAIR"])


@pytest.fixture()
def promptnet_result(study) -> VersionResult:
    roles = ["T1", "T2", "FLAIR"]
    return VersionResult(
        study_instance_uid=study.study_instance_uid, study_id=7, version=1, inputs=inputs_of(study, roles),
        available_roles=roles, missing_roles=["T1CE"],
        decisions=[Decision("promptnet", True, "promptnet runs on T1+T2+FLAIR: no T1CE, the contrast-free path."),
                   Decision("mmdlm", False, "mmdlm does not run: it needs T1CE+T2+FLAIR and T1CE is missing.")],
        results=[model("promptnet", roles, [task("grade", "LGG", {"LGG": 0.71, "HGG": 0.29})],
                       reason="promptnet runs on T1+T2+FLAIR: no T1CE, the contrast-free path.")],
    )


@pytest.fixture()
def mmdlm_result(study) -> VersionResult:
    roles = ["T1", "T1CE", "T2", "FLAIR"]
    inputs = inputs_of(study, roles)
    t2 = next(s for s in inputs if s.role == "T2")
    flair = next(s for s in inputs if s.role == "FLAIR")
    keys = [KeySlice("T2", 0.41, t2.instances[9]), KeySlice("FLAIR", 0.22, flair.instances[8])]
    return VersionResult(
        study_instance_uid=study.study_instance_uid, study_id=7, version=2, inputs=inputs,
        available_roles=roles, missing_roles=[],
        decisions=[Decision("mmdlm", True, "mmdlm runs on T1CE+T2+FLAIR, all present."),
                   Decision("promptnet", False, "promptnet does not run: T1CE is present.")],
        results=[model("mmdlm", ["T1CE", "T2", "FLAIR"], [
            task("grade", "HGG", {"LGG": 0.125, "HGG": 0.875}),
            task("idh", "IDH-mutant", {"IDH-wildtype": 0.3, "IDH-mutant": 0.7}, calibrated=False),
            task("1p19q", "1p/19q-codeleted", {"1p/19q-intact": 0.35, "1p/19q-codeleted": 0.65}),
        ], key_slices=keys)],
        quality_flags=["T2 has 16 slices (fewer than the model's 24)"],
    )


@pytest.fixture()
def cannot_grade_result(study) -> VersionResult:
    roles = ["T2"]
    return VersionResult(
        study_instance_uid=study.study_instance_uid, study_id=7, version=1, inputs=inputs_of(study, roles),
        available_roles=roles, missing_roles=["T1", "T1CE", "FLAIR"],
        decisions=[Decision("promptnet", False, "promptnet does not run: it needs T1+T2+FLAIR and T1, FLAIR "
                                                "are missing (available: T2)."),
                   Decision("mmdlm", False, "mmdlm does not run: it needs T1CE+T2+FLAIR and T1CE, FLAIR are "
                                            "missing (available: T2).")],
        results=[], cannot_grade="No model can grade this study: T1, T1CE and FLAIR are missing.",
    )


MEASUREMENTS = {"brain_volume_ml": 1548.4, "atlas_mi": 0.61, "slice_thickness_mm/T2": 5.5,
                "inplane_spacing_mm/T2": 0.9, "slices/T2": 16.0}
LOOSENED = ("The input gate was loosened at this site: measurement ranges widened by 1000% of the training "
            "range (default 25%).")


def declined(family: str = "mmdlm", sha: str = SHA_B, prepared: str | None = None) -> Declined:
    return Declined(
        family=family, paper="seed 002 (MMDLM)", checkpoint_name=f"{family}-2026.ckpt", checkpoint_sha256=sha,
        input_roles=["T1CE", "T2", "FLAIR"], stage="measurements", measurements=dict(MEASUREMENTS),
        prepared_case=prepared,
        reasons=[GateReason("slice_thickness_mm/T2", 5.5, "mm", 1.0, 1.0,
                            "slice thickness (T2) 5.5 mm; this model was trained on 1.0\u20131.0 mm"),
                 GateReason("brain_volume_ml", 1548.4, "ml", 1100.0, 1400.0,
                            "brain volume 1,548 ml; this model was trained on 1,100\u20131,400 ml")])


@pytest.fixture()
def gated_result(promptnet_result) -> VersionResult:
    """PromptNet graded (with its case's measurements), MMDLM declined by the gate, the gate loosened."""
    graded = dataclasses.replace(promptnet_result.results[0], measurements=dict(MEASUREMENTS),
                                 feature_distance=3.25, feature_threshold=7.5)
    decisions = [promptnet_result.decisions[0], Decision("mmdlm", True, "mmdlm runs on T1CE+T2+FLAIR, all present.")]
    return dataclasses.replace(promptnet_result, results=[graded], declined=[declined()], gate_loosened=LOOSENED,
                               decisions=decisions)


@pytest.fixture()
def all_declined_result(promptnet_result) -> VersionResult:
    d = declined()
    return dataclasses.replace(promptnet_result, results=[], declined=[d],
                               cannot_grade="No model could grade this study. " + d.sentence())


def _groups(path: Path) -> dict[str, list]:
    """Measurement groups of an SR by tracking identifier -> their content items."""
    ds = pydicom.dcmread(path)
    out = {}
    for container in ds.ContentSequence:
        for group in container.get("ContentSequence", []):
            items = list(group.get("ContentSequence", []))
            ident = [i.TextValue for i in items if i.ValueType == "TEXT"
                     and i.ConceptNameCodeSequence[0].CodeValue == "112039"]
            if ident:
                out[ident[0]] = items
    return out


def _names(items) -> list[str]:
    return [i.ConceptNameCodeSequence[0].CodeMeaning for i in items]


# --------------------------------------------------------------------------- codes
def test_codes_cover_every_model_label_and_name_a_source():
    from models.base import TASKS

    assert set(TASKS) == set(codes.TASK_CONCEPT)
    for labels in TASKS.values():
        for label in labels:
            assert label in codes.CLASS_CODE, label
    for name, vc in codes.all_codes().items():
        assert vc.source, name
        assert vc.code.scheme_designator in {"DCM", "SCT", "LN", "UCUM", "UMLS", codes.PRIVATE_SCHEME}, name
    # the only SNOMED codes the report may use are the ones verified (see codes.py)
    sct = {vc.code.value for vc in codes.all_codes().values() if vc.code.scheme_designator == "SCT"}
    assert sct == {"772292003", "1163375002", "371469007", "12738006"}
    assert codes.CLASS_CODE["LGG"].code.scheme_designator == codes.PRIVATE_SCHEME
    assert codes.PROBABILITY.code.value == "122157" and codes.PROBABILITY.code.scheme_designator == "DCM"


def test_measurement_codes_follow_the_models_vocabulary():
    """Every measurement models.measures defines has a private NUM concept with the same UCUM unit."""
    from models.base import ROLES
    from models.measures import MEASURES

    assert set(MEASURES) <= set(codes.MEASUREMENT_CONCEPTS)
    assert set(codes.MEASUREMENT_CONCEPTS) - set(MEASURES) == set(codes.GATE_ONLY_MEASUREMENTS)
    values = set()
    for prefix, measure in MEASURES.items():
        assert codes.MEASUREMENT_CONCEPTS[prefix][2] == measure.unit, prefix
        for name in [prefix, *(f"{prefix}/{role}" for role in (*ROLES, "OTHER"))]:
            code = codes.measurement_code(name)
            assert code is not None and len(code.code.value) <= 16, name  # CodeValue is SH
            assert code.code.scheme_designator == codes.PRIVATE_SCHEME and len(code.code.meaning) <= 64
            assert codes.measurement_unit(name).code.value == measure.unit
            values.add(code.code.value)
    assert len(values) == len(MEASURES) * (len(ROLES) + 2)  # one code per measurement and role, no clashes
    assert codes.measurement_code("no_such_measure") is None
    assert {u.code.value for u in codes.UNITS.values()} == {"1", "mm", "ml"}


# --------------------------------------------------------------------------- SR content
def test_promptnet_sr_without_t1ce(promptnet_result, study, tmp_path):
    paths = write_reports(promptnet_result, tmp_path, algorithm_version=VERSION, when=WHEN)
    assert paths == [tmp_path / SR_FILE, tmp_path / SUMMARY_FILE]
    sr_path = paths[0]
    assert_valid(sr_path)

    dump = dsrdump(sr_path)
    assert "TID 1500" in dump or '"1500"' in dump or "1500 (DCMR)" in dump, dump[:2000]
    assert "Comprehensive 3D SR" in dump
    assert '(LGG,99DCMNODE,"Low grade glioma")' in dump
    assert '"Probability"' in dump and '"0.71"' in dump
    assert "Research use only. Not for diagnostic use." in dump
    assert "no T1CE, the contrast-free path" in dump
    assert "checkpoint promptnet-2026.ckpt sha256:" + SHA_A in dump
    assert '"Missing inputs")="T1CE"' in dump
    assert "bias field strong in FLAIR" in dump
    assert "held-out test: AUC 0.91, sens 0.90, spec 0.80, n=74" in dump and "BraTS2020" in dump
    # the synthetic-training warning sits beside the disclaimer (the fixture's checkpoint says synthetic)
    assert '"Training data")="Trained on SYNTHETIC data - not for clinical use"' in dump

    ds = pydicom.dcmread(sr_path)
    src = pydicom.dcmread(study.files["T2"][0], stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.StudyInstanceUID == study.study_instance_uid
    assert ds.PatientName == src.PatientName and ds.PatientID == src.PatientID
    assert ds.PatientBirthDate == src.PatientBirthDate and ds.StudyDate == src.StudyDate
    assert ds.SeriesInstanceUID not in study.series.values()
    assert ds.SeriesNumber == 9901 and ds.SeriesDescription == "Glioma grading (research use)"
    assert [i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence] == ["99DCMNODE"]
    # evidence: exactly the three input series, every instance
    refs = {s.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in s.ReferencedSOPSequence}
            for st in ds.CurrentRequestedProcedureEvidenceSequence for s in st.ReferencedSeriesSequence}
    assert set(refs) == {study.series[r] for r in ("T1", "T2", "FLAIR")}
    for s in promptnet_result.inputs:
        assert refs[s.series_instance_uid] == {r.sop_instance_uid for r in s.instances}
    assert "PertinentOtherEvidenceSequence" not in ds


def test_mmdlm_sr_findings_probabilities_and_key_slices(mmdlm_result, study, tmp_path):
    sr = build_sr(mmdlm_result, algorithm_version=VERSION, when=WHEN)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid(path)
    dump = dsrdump(path)
    for needle in ('(772292003,SCT,"High grade glioma")', '(IDHMUT,99DCMNODE,"IDH-mutant")',
                   '(1P19QCODEL,99DCMNODE,"1p/19q co-deleted")', '"Histologic grade"', '"IDH mutation status"',
                   '"0.875"', '"0.7"', '"0.65"', '(12738006,SCT,"Brain")', "MMDLM runs on T1CE+T2+FLAIR",
                   "Adaptive PromptNet (non-contrast) does not run: T1CE is present.", "fewer than the model's 24",
                   '(111001,DCM,"Algorithm Name")', '(111003,DCM,"Algorithm Version")'):
        assert needle in dump, needle
    assert dump.count('"Measurement Group"') == 3  # one per task
    # key slices are image references in the content, and in the evidence
    content_refs = {k.ref.sop_instance_uid for k in mmdlm_result.results[0].key_slices}
    for uid in content_refs:
        assert uid in dump
    ds = pydicom.dcmread(path)
    evidence = {r.ReferencedSOPInstanceUID for st in ds.CurrentRequestedProcedureEvidenceSequence
                for s in st.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert content_refs <= evidence
    assert len(evidence) == sum(len(s.instances) for s in mmdlm_result.inputs)
    # the highdicom reader understands what we wrote: three groups, findings as coded
    import highdicom as hd

    parsed = hd.sr.srread(path)
    groups = parsed.content.get_image_measurement_groups()
    assert [g.finding_type.meaning for g in groups] == ["High grade glioma", "IDH-mutant", "1p/19q co-deleted"]
    assert [round(g.get_measurements()[0].value, 3) for g in groups] == [0.875, 0.7, 0.65]


def test_cannot_grade_sr_says_why_without_a_finding(cannot_grade_result, tmp_path):
    paths = write_reports(cannot_grade_result, tmp_path, algorithm_version=VERSION, when=WHEN)
    for p in paths:
        assert_valid(p)
    dump = dsrdump(paths[0])
    assert '"Finding"' not in dump and '"Probability"' not in dump
    assert "No model can grade this study: T1, T1CE and FLAIR are missing." in dump
    assert '"Missing inputs")="T1, T1CE, FLAIR"' in dump
    assert "Adaptive PromptNet (non-contrast) does not run: it needs T1+T2+FLAIR" in dump
    assert "Research use only. Not for diagnostic use." in dump
    text = describe(paths[0])
    assert "CANNOT GRADE: No model can grade this study" in text


def test_sr_carries_measurements_declined_models_and_the_loosened_gate(gated_result, tmp_path):
    path = write_reports(gated_result, tmp_path, algorithm_version=VERSION, when=WHEN, summary_image=False)[0]
    assert_valid(path)
    dump = dsrdump(path)
    # the graded model's case measurements: NUM items with UCUM units, in a group of their own
    for needle in ('NUM:(BRAINVOL,99DCMNODE,"Brain volume")="1548.4" (ml,UCUM,"milliliter")',
                   'NUM:(SLICETHICK-T2,99DCMNODE,"Slice thickness (T2)")="5.5" (mm,UCUM,"mm")',
                   'NUM:(ATLASMI,99DCMNODE,"Registration to template (mutual information)")="0.61" (1,UCUM,"no units")',
                   'NUM:(FEATDIST,99DCMNODE,"Image-feature distance from training data")="3.25"',
                   '"Input gate loosened")="' + LOOSENED,
                   # the declined model: each reason as TEXT (Latin-1: the en dash becomes "-") ...
                   '"Input gate finding")="slice thickness (T2) 5.5 mm; this model was trained on 1.0-1.0 mm"',
                   '"Input gate finding")="brain volume 1,548 ml; this model was trained on 1,100-1,400 ml"',
                   "MMDLM did not grade this study",
                   '"Model path and reason")="MMDLM: selected, then declined by the input gate. MMDLM runs on'):
        assert needle in dump, needle
    groups = _groups(path)
    assert set(groups) == {"promptnet grade", "promptnet input measurements", "mmdlm declined"}
    # ... and NEVER a finding, a probability or a class for it
    assert not {"Finding", "Probability", "Histologic grade", "Class probabilities"} & set(_names(groups["mmdlm declined"]))
    assert "Finding" not in _names(groups["promptnet input measurements"])
    nums = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
            for i in groups["mmdlm declined"] if i.ValueType == "NUM"}
    assert nums["SLICETHICK-T2"] == 5.5 and nums["BRAINVOL"] == 1548.4
    import highdicom as hd

    parsed = hd.sr.srread(path)
    found = [g.finding_type.meaning for g in parsed.content.get_image_measurement_groups() if g.finding_type]
    assert found == ["Low grade glioma"]  # the declined model contributes no finding
    text = describe(path)
    assert "* MMDLM: not graded (declined by the input gate)" in text
    graded = text.split("* MMDLM: not graded")[0].split("* Adaptive PromptNet (non-contrast)")[1]
    assert "Brain volume: 1548.4 ml" in graded and "MMDLM" not in graded
    # the declined checkpoint counts for the report's identity: the same question under another gate setting
    # is answered in the same object
    graded_too = dataclasses.replace(gated_result, declined=[], results=[*gated_result.results, dataclasses.replace(
        gated_result.results[0], family="mmdlm", checkpoint_sha256=SHA_B)])
    assert report_uids(graded_too) == report_uids(gated_result)


def test_cannot_grade_because_every_model_was_declined(all_declined_result, tmp_path):
    paths = write_reports(all_declined_result, tmp_path, algorithm_version=VERSION, when=WHEN)
    for p in paths:
        assert_valid(p)
    dump = dsrdump(paths[0])
    assert '"Finding"' not in dump and '"Probability"' not in dump
    assert ('"Cannot grade")="No model could grade this study. MMDLM: slice thickness (T2) '
            '5.5 mm; this model was trained on 1.0-1.0 mm; brain volume 1,548 ml; this model was trained on '
            '1,100-1,400 ml."') in dump
    assert 'NUM:(SLICETHICK-T2,99DCMNODE,"Slice thickness (T2)")="5.5"' in dump
    assert "CANNOT GRADE: No model could grade this study. MMDLM" in describe(paths[0])
    from dicomnode.stages.report.summary import summary_lines

    lines = summary_lines(all_declined_result)
    joined = " ".join(t for _, t in lines)
    assert "CANNOT GRADE" in joined and "not graded: slice thickness (T2) 5.5 mm" in joined
    assert "Grade:" not in joined and "P(" not in joined


def test_old_result_files_without_the_gate_still_load(gated_result):
    import json

    again = VersionResult.from_json(gated_result.to_json())
    assert again == gated_result
    old = json.loads(gated_result.to_json())
    del old["declined"], old["gate_loosened"]
    for m in old["results"]:
        for k in ("measurements", "prepared_case", "feature_distance", "feature_threshold"):
            del m[k]
        for key in m["key_slices"]:
            key.pop("grid_index", None)
    back = VersionResult.from_json(json.dumps(old))
    assert back.declined == [] and back.gate_loosened is None and back.results[0].measurements == {}


def test_sr_and_summary_name_the_operating_threshold(promptnet_result, tmp_path):
    """P(HGG) = 0.29 reads HGG under a validation threshold of 0.25: the report must say why."""
    from dicomnode.stages.report.summary import summary_lines

    chosen = TaskResult("grade", "HGG", 0.29, {"LGG": 0.71, "HGG": 0.29}, True, 0.25, "validation")
    m = promptnet_result.results[0]
    result = dataclasses.replace(promptnet_result, results=[dataclasses.replace(m, tasks=[chosen])])
    sr = build_sr(result, algorithm_version=VERSION, when=WHEN)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    text = describe(tmp_path / "sr.dcm")
    assert ("Operating threshold: HGG when calibrated P(HGG) >= 0.250, else LGG "
            "(operating threshold chosen on validation data)") in text
    lines = [t for _, t in summary_lines(result)]
    assert "P(HGG) = 0.29 >= threshold 0.25 (validation); calibrated" in lines
    # a checkpoint without a stored threshold: the report says 0.5 is the default, not a choice
    sr = build_sr(promptnet_result, algorithm_version=VERSION, when=WHEN)
    sr.save_as(tmp_path / "sr0.dcm", enforce_file_format=True)
    assert ("Operating threshold: HGG when calibrated P(HGG) >= 0.500, else LGG (default threshold: the "
            "checkpoint stores none chosen on validation data)") in describe(tmp_path / "sr0.dcm")
    assert "P(HGG) = 0.29 < threshold 0.50 (default); calibrated" in [t for _, t in summary_lines(promptnet_result)]
    # the result file keeps the threshold; one written before thresholds existed reads as the default
    again = VersionResult.from_json(result.to_json())
    assert again.results[0].tasks[0].threshold == 0.25 and again.results[0].tasks[0].threshold_source == "validation"
    import json

    old = json.loads(result.to_json())
    for t in old["results"][0]["tasks"]:
        del t["threshold"], t["threshold_source"]
    back = VersionResult.from_json(json.dumps(old)).results[0].tasks[0]
    assert (back.threshold, back.threshold_source) == (0.5, "default")


def test_superseding_sr_names_its_predecessor(mmdlm_result, tmp_path):
    first = build_sr(dataclasses.replace(mmdlm_result, version=1), algorithm_version=VERSION, when=WHEN)
    second_result = dataclasses.replace(
        mmdlm_result, supersedes=Superseded(1, first.SOPInstanceUID, first.SeriesInstanceUID))
    path = write_reports(second_result, tmp_path, algorithm_version=VERSION, when=WHEN, summary_image=False)[0]
    assert_valid(path)
    ds = pydicom.dcmread(path)
    pred = ds.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == mmdlm_result.study_instance_uid
    series = pred.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ds.SOPInstanceUID != first.SOPInstanceUID  # another version is another report
    dump = dsrdump(path)
    assert "replaces the report of study version 1" in dump and first.SOPInstanceUID in dump
    assert f"Predecessor document: {first.SOPInstanceUID}" in describe(path)
    assert not (tmp_path / SUMMARY_FILE).exists()


# --------------------------------------------------------------------------- determinism
def test_uids_are_deterministic_and_depend_on_the_right_things(mmdlm_result, promptnet_result, tmp_path):
    uids = report_uids(mmdlm_result)
    assert set(uids) == {"sr_series", "sr_sop", "sc_series", "sc_sop"} and len(set(uids.values())) == 4
    assert report_uids(mmdlm_result) == uids
    # wording, timings, flags and reasons do not make another report ...
    reworded = dataclasses.replace(mmdlm_result, timings={"infer": 9.0}, quality_flags=[],
                                   decisions=[Decision("mmdlm", True, "other words")])
    assert report_uids(reworded) == uids
    # ... another checkpoint, another version or other inputs do
    other_ckpt = dataclasses.replace(mmdlm_result, results=[
        dataclasses.replace(mmdlm_result.results[0], checkpoint_sha256=SHA_B)])
    for other in (other_ckpt, dataclasses.replace(mmdlm_result, version=3), promptnet_result):
        assert set(report_uids(other).values()).isdisjoint(uids.values())
    assert report_uids(mmdlm_result, prefix="1.2.3.")["sr_sop"].startswith("1.2.3.")

    a = write_reports(mmdlm_result, tmp_path / "a", algorithm_version=VERSION, when=WHEN)
    b = write_reports(mmdlm_result, tmp_path / "b", algorithm_version=VERSION, when=WHEN)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    again = write_reports(mmdlm_result, tmp_path / "a", algorithm_version=VERSION, when=WHEN)  # re-run in place
    assert again == a and sorted(p.name for p in (tmp_path / "a").iterdir()) == [SR_FILE, SUMMARY_FILE]
    ds = pydicom.dcmread(a[0])
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (uids["sr_sop"], uids["sr_series"])
    assert ds.ContentDate == "20260304" and ds.InstanceCreationTime.startswith("101112")
    # a later run at another time: same UIDs, only the date/time stamps differ
    later = build_sr(mmdlm_result, algorithm_version=VERSION, when=WHEN + dt.timedelta(days=1))
    assert later.SOPInstanceUID == uids["sr_sop"] and str(later.ContentDate) == "20260305"
    other_sr = build_sr(other_ckpt, algorithm_version=VERSION, when=WHEN)
    assert other_sr.SOPInstanceUID != uids["sr_sop"] and other_sr.SeriesInstanceUID != uids["sr_series"]


def _encoded(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("which", ["mmdlm", "gated", "cannot_grade", "all_declined", "superseding"])
def test_light_sr_path_writes_what_highdicom_checked_path_writes(which, request):
    """The default SR path skips highdicom's re-parse of the content and its evidence search: same bytes."""
    name = {"mmdlm": "mmdlm_result", "gated": "gated_result", "cannot_grade": "cannot_grade_result",
            "all_declined": "all_declined_result", "superseding": "mmdlm_result"}[which]
    result = request.getfixturevalue(name)
    if which == "superseding":
        result = dataclasses.replace(result, supersedes=Superseded(1, "1.2.826.0.1.3680043.8.498.1",
                                                                   "1.2.826.0.1.3680043.8.498.2"))
    example = read_example(result)
    kw = dict(algorithm_version=VERSION, when=WHEN)
    light = sr_from_example(result, example, **kw)
    checked = sr_from_example(result, example, highdicom_checks=True, **kw)
    assert _encoded(light) == _encoded(checked)
    # highdicom's own view of the content (its public ``content``) is the whole tree, not the stub it was given
    assert len(light.content[0].ContentSequence) == len(checked.content[0].ContentSequence) > 1
    assert light.get_evidence() == checked.get_evidence()


def test_enhanced_key_slice_frames_same_on_both_paths(enhanced_study):
    inputs = inputs_of(enhanced_study, ["T1CE", "T2", "FLAIR"])
    flair = next(s for s in inputs if s.role == "FLAIR")
    result = VersionResult(
        study_instance_uid=enhanced_study.study_instance_uid, study_id=8, version=1, inputs=inputs,
        available_roles=["T1CE", "T2", "FLAIR"], missing_roles=["T1"],
        decisions=[Decision("mmdlm", True, "mmdlm runs on T1CE+T2+FLAIR, all present.")],
        results=[model("mmdlm", ["T1CE", "T2", "FLAIR"], [task("grade", "LGG", {"LGG": 0.6, "HGG": 0.4})],
                       key_slices=[KeySlice("FLAIR", 0.5, flair.instances[7]), KeySlice("T2", 0.3, flair.instances[3])])])
    example = read_example(result)
    kw = dict(algorithm_version=VERSION, when=WHEN)
    assert _encoded(sr_from_example(result, example, **kw)) == _encoded(
        sr_from_example(result, example, highdicom_checks=True, **kw))


def test_warm_builds_in_memory_and_changes_no_output(mmdlm_result, tmp_path, monkeypatch, caplog):
    """warm(ctx) pays the one-time costs without a file or an INFO line; what is written afterwards is the same."""
    before = write_reports(mmdlm_result, tmp_path / "before", algorithm_version=VERSION, when=WHEN)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="dicomnode"):
        thread = threading.Thread(target=warm, args=(None,))  # as the runtime calls it
        thread.start()
        thread.join(timeout=600)
    assert not thread.is_alive()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before"]
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    after = write_reports(mmdlm_result, tmp_path / "after", algorithm_version=VERSION, when=WHEN)
    for a, b in zip(before, after):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_failed_summary_leaves_the_previous_report_and_no_temporary_files(mmdlm_result, tmp_path, monkeypatch):
    first = write_reports(mmdlm_result, tmp_path, algorithm_version=VERSION, when=WHEN)
    old = [p.read_bytes() for p in first]

    def broken(*args, **kwargs):
        raise RuntimeError("no picture today")

    monkeypatch.setattr(report_stage, "summary_from_example", broken)
    with pytest.raises(RuntimeError, match="no picture today"):
        write_reports(mmdlm_result, tmp_path, algorithm_version=VERSION, when=WHEN + dt.timedelta(days=1))
    assert [p.read_bytes() for p in first] == old  # the SR of the failed call never replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == [SR_FILE, SUMMARY_FILE]  # no temporary file left
    paths, seconds = timed_write_reports(mmdlm_result, tmp_path, algorithm_version=VERSION, when=WHEN,
                                         summary_image=False)
    assert paths == [tmp_path / SR_FILE] and set(seconds) == {"sr", "summary", "write"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [SR_FILE]


# --------------------------------------------------------------------------- summary image
def test_summary_image_is_valid_rgb_secondary_capture(mmdlm_result, study, tmp_path):
    (sc,) = build_summary(mmdlm_result, algorithm_version=VERSION, when=WHEN)  # it fits on one image
    path = tmp_path / "summary.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert_valid(path)
    ds = pydicom.dcmread(path)
    uids = report_uids(mmdlm_result)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (uids["sc_sop"], uids["sc_series"])
    assert ds.StudyInstanceUID == study.study_instance_uid and ds.SeriesNumber == 9902
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    arr = ds.pixel_array
    assert arr.shape == (768, 1024, 3) and arr.dtype == np.uint8
    # the key-slice frame is drawn in yellow (#ffcc00) around the left panel
    yellow = (arr[..., 0] > 240) & (arr[..., 1] > 190) & (arr[..., 1] < 220) & (arr[..., 2] < 30)
    assert yellow[:, :460].sum() > 1000
    png = summary_png(path, tmp_path / "summary.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no patient identity is burnt into the page (it is text we draw: check the inputs to it)
    from dicomnode.stages.report.summary import summary_lines

    joined = " ".join(t for _, t in summary_lines(mmdlm_result))
    assert PATIENT_NAME.split("^")[0] not in joined and PATIENT_ID not in joined
    assert "Grade: HGG" in joined and "IDH: IDH-mutant" in joined and "missing: none" in joined


def _prepared_cases(out: Path) -> tuple[Path, Path, int]:
    """A volume case (with a template brain) and a slice case of the phantom, saved as the pipeline saves them."""
    from scipy import ndimage

    from models.casefile import save_case
    from models.preprocess import apply_spec, slice_spec, volume_spec

    vols, affine = make_phantom(shape=(40, 40, 16), spacing=(5.0, 5.0, 8.0), seed=3, grade="HGG")
    brain = ndimage.binary_erosion(vols["T1"] > np.percentile(vols["T1"], 60), iterations=1)
    stripped = {r: np.where(brain, v, 0).astype(np.float32) for r, v in vols.items()}
    spec = volume_spec(["T1", "T2", "FLAIR"], (40, 40, 32), spacing=(5.0, 5.0, 5.0))
    case = apply_spec(spec, {r: (stripped[r], affine) for r in spec["roles"]})
    case.meta["spec"] = spec
    case.template_mask = ndimage.binary_dilation(case.mask, iterations=2)
    save_case(case, out / "volume.npz")
    sspec = slice_spec(["T1CE", "T2", "FLAIR"], count=12, size=(32, 32), spacing=(5.0, 5.0, 5.0), shape=(40, 40, 32))
    sc = apply_spec(sspec, {r: (stripped[r], affine) for r in sspec["roles"]})
    sc.meta["spec"] = sspec
    save_case(sc, out / "slices.npz")
    return out / "volume.npz", out / "slices.npz", int(sc.slice_indices[5])


def _inside(result: VersionResult, panel) -> None:
    """Every piece of text drawn on the page lies inside it, and the slice's box too."""
    pages = layout(result, panel, algorithm_version=VERSION)
    assert pages and pages[0].frame is not None
    for page in pages:
        assert page.texts
        for t in page.texts:
            x0, y0, x1, y1 = t.box()
            assert x0 >= 0 and y0 >= 0 and x1 <= WIDTH and y1 <= HEIGHT, (t.text, (x0, y0, x1, y1))
    left, bottom, width, height = pages[0].frame
    assert 0 <= left and 0 <= bottom and left + width <= 1 and bottom + height <= 1


def test_summary_shows_what_the_model_saw(gated_result, mmdlm_result, tmp_path):
    from dicomnode.stages.report.summary import MASK_COLOUR, TEMPLATE_COLOUR, choose_panel, summary_lines

    volume, slices, grid_index = _prepared_cases(tmp_path)
    # a graded volume model and a declined one: the graded model's prepared case, axial, with both outlines
    result = dataclasses.replace(gated_result, results=[dataclasses.replace(gated_result.results[0],
                                                                            prepared_case=str(volume))],
                                 declined=[declined(prepared=str(slices))])
    panel = choose_panel(result)
    assert panel is not None and "as Adaptive PromptNet (non-contrast) saw it (template grid" in panel.caption
    assert not panel.key
    assert panel.pixels.shape == (40, 40)
    assert [(colour, label) for _, colour, label in panel.outlines] == [(MASK_COLOUR, "brain mask"),
                                                                       (TEMPLATE_COLOUR, "template brain")]
    assert all(o.shape == panel.pixels.shape and o.any() and not o.all() for o, _, _ in panel.outlines)
    assert panel.steps[:2] == ["reorient to RAS", "resample to 5.0x5.0x5.0 mm (grid 40x40x26)"]
    assert any(line.startswith("brain mask (nonzero): ") for line in panel.steps)
    _inside(result, panel)
    (ds,) = build_summary(result, algorithm_version=VERSION, when=WHEN)
    path = tmp_path / "summary.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert_valid(path)
    arr = pydicom.dcmread(path).pixel_array
    left = arr[:, :460].astype(int)
    cyan = (left[..., 0] < 60) & (left[..., 1] > 200) & (left[..., 2] > 230)
    magenta = (left[..., 0] > 230) & (left[..., 1] < 110) & (left[..., 2] > 190)
    assert cyan.sum() > 100 and magenta.sum() > 100
    joined = " ".join(t for _, t in summary_lines(result))
    assert "not graded: slice thickness (T2) 5.5 mm" in joined and LOOSENED in joined
    assert "DECLINED by the gate: MMDLM runs on" in joined and "RAN: MMDLM" not in joined
    assert joined.count("Grade:") == 1  # promptnet's; the declined MMDLM shows no grade
    # the key slice of a slice model, from its prepared bag, with the brain-mask outline
    t2 = next(s for s in mmdlm_result.inputs if s.role == "T2")
    key = KeySlice("T2", 0.41, t2.instances[9], grid_index=grid_index)
    mm = dataclasses.replace(mmdlm_result, results=[dataclasses.replace(mmdlm_result.results[0], key_slices=[key],
                                                                        prepared_case=str(slices))])
    panel = choose_panel(mm)
    assert panel is not None and panel.key and panel.caption == "Key slice (T2) as MMDLM saw it, attention 0.41"
    assert panel.pixels.shape == (32, 32) and [label for _, _, label in panel.outlines] == ["brain mask"]
    assert panel.steps[-1] == "slices: 12 of a bag of 12 (axis 2)"
    _inside(mm, panel)
    # only a declined model prepared a case: its case is shown, and still no grade anywhere
    only = dataclasses.replace(gated_result, results=[], declined=[declined(prepared=str(volume))],
                               cannot_grade="No model could grade this study.")
    panel = choose_panel(only)
    assert panel is not None and "as MMDLM saw it" in panel.caption
    assert "Grade:" not in " ".join(t for _, t in summary_lines(only))
    _inside(only, panel)
    # a case file that is gone: the source series, as before
    gone = dataclasses.replace(result, results=[dataclasses.replace(result.results[0],
                                                                    prepared_case=str(tmp_path / "gone.npz"))],
                               declined=[])
    panel = choose_panel(gone)
    assert panel is not None and panel.caption.startswith("Middle slice of") and panel.outlines == []


def test_summary_text_stays_on_the_page_with_long_reasons(all_declined_result, tmp_path):
    from dicomnode.stages.report.summary import choose_panel

    volume, _, _ = _prepared_cases(tmp_path)
    long_reason = GateReason("intensity_cv/FLAIR", 9.99, "1", 0.1, 0.2, "intensity spread inside the brain "
                             "(std/mean) (FLAIR) 9.99; this model was trained on 0.10-0.20 " + "x" * 200)
    d = dataclasses.replace(declined(prepared=str(volume)), reasons=[long_reason] * 6)
    result = dataclasses.replace(all_declined_result, declined=[d, d], gate_loosened=LOOSENED * 3,
                                 cannot_grade="No model could grade this study. " + d.sentence() * 3)
    _inside(result, choose_panel(result))


def test_summary_without_key_slices_uses_middle_t1ce_or_flair(promptnet_result, cannot_grade_result):
    from dicomnode.stages.report.summary import choose_panel

    panel = choose_panel(promptnet_result)  # no T1CE in this version: FLAIR
    assert panel is not None and not panel.key and "FLAIR" in panel.caption
    assert panel.pixels.ndim == 2 and panel.pixels.max() > 0
    panel = choose_panel(cannot_grade_result)  # only T2
    assert panel is not None and "T2" in panel.caption


def test_enhanced_mr_key_slice_frames(enhanced_study, tmp_path):
    roles = ["T1CE", "T2", "FLAIR"]
    inputs = inputs_of(enhanced_study, roles)
    flair = next(s for s in inputs if s.role == "FLAIR")
    key = KeySlice("FLAIR", 0.5, flair.instances[7])
    assert key.ref.frame == 8
    result = VersionResult(
        study_instance_uid=enhanced_study.study_instance_uid, study_id=8, version=1, inputs=inputs,
        available_roles=roles, missing_roles=["T1"],
        decisions=[Decision("mmdlm", True, "mmdlm runs on T1CE+T2+FLAIR, all present.")],
        results=[model("mmdlm", roles, [task("grade", "LGG", {"LGG": 0.6, "HGG": 0.4})], key_slices=[key])])
    paths = write_reports(result, tmp_path, algorithm_version=VERSION, when=WHEN)
    for p in paths:
        assert_valid(p)
    ds = pydicom.dcmread(paths[0])
    images = [item for g in ds.ContentSequence for item in g.get("ContentSequence", [])
              for item in item.get("ContentSequence", []) if item.ValueType == "IMAGE"]
    assert [int(i.ReferencedSOPSequence[0].ReferencedFrameNumber) for i in images] == [8]
    evidence = [s for st in ds.CurrentRequestedProcedureEvidenceSequence for s in st.ReferencedSeriesSequence]
    assert sorted(len(s.ReferencedSOPSequence) for s in evidence) == [1, 1, 1]  # one multi-frame file each
    from dicomnode.stages.report.summary import choose_panel

    panel = choose_panel(result)
    assert panel is not None and panel.key and "frame 8" in panel.caption


# --------------------------------------------------------------------------- views, safety
def test_describe_and_html(mmdlm_result, tmp_path):
    """Terminal and HTML views: disclaimer and warning first, each model once by its plain name, key slices once."""
    sr_path = write_reports(mmdlm_result, tmp_path, algorithm_version=VERSION, when=WHEN, summary_image=False)[0]
    keys = [k.ref.sop_instance_uid for k in mmdlm_result.results[0].key_slices]
    # the SR itself: every task group references the key slices as IMAGE sources, their TEXT lines are written once
    sr = pydicom.dcmread(sr_path)
    key_texts = [i.TextValue for _, i in _items(sr) if i.ValueType == "TEXT"
                 and i.ConceptNameCodeSequence[0].CodeValue == "KEYSLICE"]
    assert len(key_texts) == len(keys) == 2
    images = [i for _, i in _items(sr) if i.ValueType == "IMAGE"]
    assert len(images) == 3 * len(keys)  # grade, IDH, 1p/19q
    text = describe(sr_path)
    lines = text.splitlines()
    assert lines[1].startswith("!! Research use only. Not for diagnostic use.")
    assert lines[2] == "!! Trained on SYNTHETIC data - not for clinical use"
    assert "* MMDLM  (checkpoint mmdlm-2026.ckpt sha256:" + SHA_A + ")" in lines
    assert "    grade: High grade glioma (SCT 772292003), probability 0.875" in lines
    assert "    IDH: IDH-mutant (99DCMNODE IDHMUT), probability 0.7" in lines
    assert "    Model path and reason: MMDLM runs on T1CE+T2+FLAIR." in lines
    assert "P(LGG) = 0.125, P(HGG) = 0.875" in text
    assert text.count("Key slices (2):") == 1
    for uid in keys:
        assert text.count(uid) == 1, uid  # once, not once per task
    assert text.count("Model path and reason: MMDLM runs on") == 1
    assert not re.search(r"(?<![\w./'-])mmdlm(?![\w/'-]|\.\w)", text)  # the code name only inside identifiers
    assert "seed 002" not in text

    html_path = render_html(sr_path, tmp_path / "sr.html")
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    body = page[page.index("<body>"):]
    assert body.index("Research use only") < body.index("Trained on SYNTHETIC data") < body.index("<h2>MMDLM</h2>")
    # values in their own cells, not run together after the concept name
    assert ("<td>grade</td><td><strong>High grade glioma (SCT 772292003)</strong></td><td>0.875</td>"
            "<td>P(LGG) = 0.125, P(HGG) = 0.875 (calibrated)</td>") in page
    summary = body[:body.index("<details>")]
    for uid in keys:
        assert summary.count(uid) == 1, uid
    assert summary.count("<dt>Key slices</dt>") == 1
    # dcmtk's reference renderer still accepts the SR
    done = subprocess.run([dcmtk_tool("dsr2html"), str(sr_path), str(tmp_path / "dcmtk.html")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "High grade glioma" in (tmp_path / "dcmtk.html").read_text(errors="replace")


def _items(ds) -> list:
    """Every content item of an SR (depth, item), in tree order."""
    out = []

    def walk(items, depth):
        for item in items:
            out.append((depth, item))
            walk(item.get("ContentSequence", []), depth + 1)

    walk(ds.ContentSequence, 0)
    return out


def test_refuses_a_source_file_from_another_study(mmdlm_result, enhanced_study):
    wrong = dataclasses.replace(mmdlm_result, inputs=[
        dataclasses.replace(mmdlm_result.inputs[0], example_file=str(enhanced_study.files["T2"][0]))])
    with pytest.raises(ValueError, match="another study"):
        build_sr(wrong, algorithm_version=VERSION)
    with pytest.raises(ValueError, match="no input series"):
        build_sr(dataclasses.replace(mmdlm_result, inputs=[]), algorithm_version=VERSION)


def test_refuses_an_impossible_probability(promptnet_result):
    bad = dataclasses.replace(promptnet_result, results=[dataclasses.replace(
        promptnet_result.results[0], tasks=[TaskResult("grade", "LGG", 0.5, {"LGG": 1.5, "HGG": -0.5}, True)])])
    with pytest.raises(ValueError, match="outside"):
        build_sr(bad, algorithm_version=VERSION)


def test_no_phi_in_logs_at_info(mmdlm_result, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="dicomnode"):
        write_reports(mmdlm_result, tmp_path, algorithm_version=VERSION, when=WHEN)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert info, "the report stage should say what it did"
    for msg in info:
        assert PATIENT_ID not in msg and "SYNTHETIC" not in msg and mmdlm_result.study_instance_uid not in msg


def test_cannot_grade_sr_of_a_study_with_no_usable_series(cannot_grade_result, study, tmp_path):
    """A study the node could not read at all (no series identified or converted) still gets its SR, in its study.

    A fuzzed study once failed the report step here: the result listed no
    input series to copy patient and study attributes from.
    """
    example = str(inputs_of(study, ["T2"])[0].example_file)
    result = dataclasses.replace(cannot_grade_result, inputs=[], available_roles=[],
                                 missing_roles=["T1", "T1CE", "T2", "FLAIR"], source_example=example,
                                 cannot_grade="No model could grade this study. No series could be used.")
    paths = write_reports(result, tmp_path, algorithm_version=VERSION, when=WHEN)
    for p in paths:
        assert_valid(p)
    sr = pydicom.dcmread(paths[0])
    assert str(sr.StudyInstanceUID) == study.study_instance_uid
    assert str(sr.PatientName) == PATIENT_NAME and sr.PatientID == PATIENT_ID
    assert "No series could be used." in dsrdump(paths[0])
    with pytest.raises(ValueError, match="source example"):
        dataclasses.replace(result, source_example=None)


def test_a_source_without_type2_patient_attributes_still_gets_its_sr(cannot_grade_result, study, tmp_path):
    """Senders omit Type 2 attributes (birth date, sex, accession number); the report fills them in empty."""
    src = pydicom.dcmread(inputs_of(study, ["T2"])[0].example_file)
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in src:
            delattr(src, keyword)
    bare = tmp_path / "bare.dcm"
    src.save_as(bare)
    result = dataclasses.replace(cannot_grade_result, inputs=[], available_roles=[],
                                 missing_roles=["T1", "T1CE", "T2", "FLAIR"], source_example=str(bare))
    paths = write_reports(result, tmp_path / "out", algorithm_version=VERSION, when=WHEN)
    for p in paths:
        assert_valid(p)
    sr = pydicom.dcmread(paths[0])
    assert sr.PatientBirthDate == "" and sr.PatientID == PATIENT_ID
