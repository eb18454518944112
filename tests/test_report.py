"""The report stage with real parts: synthetic DICOM studies, highdicom, dciodvfy, dcmtk's dsrdump/dsr2html."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.pipeline.results import (
    Decision,
    InputSeries,
    KeySlice,
    ModelResult,
    SourceRef,
    Superseded,
    TaskResult,
    VersionResult,
)
from dicomnode.report import (
    SR_FILE,
    SUMMARY_FILE,
    build_sr,
    build_summary,
    describe,
    render_html,
    report_uids,
    summary_png,
    write_reports,
)
from dicomnode.report import codes
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
    assert "held-out test (n=74): auc 0.91" in dump and "BraTS2020" in dump

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
                   '"0.875"', '"0.7"', '"0.65"', '(12738006,SCT,"Brain")', "mmdlm runs on T1CE+T2+FLAIR",
                   "promptnet does not run: T1CE is present.", "fewer than the model's 24",
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
    assert "promptnet does not run: it needs T1+T2+FLAIR" in dump
    assert "Research use only. Not for diagnostic use." in dump
    text = describe(paths[0])
    assert "CANNOT GRADE: No model can grade this study" in text


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


# --------------------------------------------------------------------------- summary image
def test_summary_image_is_valid_rgb_secondary_capture(mmdlm_result, study, tmp_path):
    sc = build_summary(mmdlm_result, algorithm_version=VERSION, when=WHEN)
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
    from dicomnode.report.summary import summary_lines

    joined = " ".join(t for _, t in summary_lines(mmdlm_result))
    assert PATIENT_NAME.split("^")[0] not in joined and PATIENT_ID not in joined
    assert "Grade: HGG" in joined and "IDH: IDH-mutant" in joined and "missing: none" in joined


def test_summary_without_key_slices_uses_middle_t1ce_or_flair(promptnet_result, cannot_grade_result):
    from dicomnode.report.summary import choose_panel

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
    from dicomnode.report.summary import choose_panel

    panel = choose_panel(result)
    assert panel is not None and panel.key and "frame 8" in panel.caption


# --------------------------------------------------------------------------- views, safety
def test_describe_and_html(mmdlm_result, tmp_path):
    sr_path = write_reports(mmdlm_result, tmp_path, algorithm_version=VERSION, when=WHEN, summary_image=False)[0]
    text = describe(sr_path)
    assert text.splitlines()[1].startswith("!! Research use only. Not for diagnostic use.")
    assert "* mmdlm grade: High grade glioma (SCT 772292003), probability 0.875" in text
    assert "* mmdlm IDH: IDH-mutant (99DCMNODE IDHMUT), probability 0.7" in text
    assert "Model path and reason: mmdlm runs on T1CE+T2+FLAIR" in text
    assert "P(LGG) = 0.125, P(HGG) = 0.875" in text
    from dicomnode.report.render import _fallback_html

    fallback = _fallback_html(sr_path)  # what a host without dcmtk gets
    assert "High grade glioma" in fallback and "Research use only" in fallback and "<script" not in fallback
    html_path = render_html(sr_path, tmp_path / "sr.html")
    need(Path("/usr/bin/dsr2html").exists(), "dcmtk dsr2html not installed")
    page = html_path.read_text(errors="replace")
    assert "<html" in page.lower() and "High grade glioma" in page and "Research use only" in page


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
