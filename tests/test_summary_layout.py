"""The summary image a clinician reads at a glance: nothing cut, nothing overlapping, plain names, the warnings.

Real parts: a synthetic DICOM study (``dicomnode.synth``), prepared cases saved
as the pipeline saves them, the page drawn with the fonts it always uses
(matplotlib's DejaVu Sans files through FreeType), dciodvfy for the objects,
and the SR read back for the terminal view. Three studies: two models graded
(Full-sequence 3D CNN and a three-task MMDLM with nine key slices), one no
model could grade (both declined by the gate), and a long one (many quality
flags, declined models with long reasons, long series descriptions) that
needs a second image.

``DICOMNODE_SUMMARY_EXAMPLES=/some/dir`` also writes each image as a PNG there,
to look at.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.handoff import Decision, Declined, GateReason, KeySlice, ModelResult, VersionResult
from dicomnode.stages.report import describe, summary_file, write_reports
from dicomnode.stages.report import content
from dicomnode.stages.report import summary as sm
from dicomnode.synth import make_phantom, write_study

from test_report import _prepared_cases, assert_valid, inputs_of, task

WHEN = dt.datetime(2026, 3, 4, 10, 11, 12)
VERSION = "0.3.0-test"
SYNTHETIC = {"description": "synthetic demo cohort (dicomnode training module), NOT for clinical use",
             "train": {"n_cases": 60, "labels": {"grade": {"HGG": 47, "LGG": 13}}}, "protocol": "promptnet",
             "row": "fs"}
SITE = {"description": "BraTS2020 training data, site copy (295 cases)", "train": {"n_cases": 295}}
CODE_NAMES = ("fs3dcnn", "promptnet", "crossmodal", "mmdlm")
PAPERS = ("seed 000", "seed 001", "seed 002", "template network", "3D CNN FS-MRI")
# a family's code name as a free-standing word (inside a file name or a quoted identifier it is an identifier)
FREE_CODE_NAME = re.compile(r"(?<![\w./'-])(" + "|".join(CODE_NAMES) + r")(?![\w/'-]|\.\w)")
AMBER = np.array([0xff, 0xb0, 0x00])


# --------------------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def study(tmp_path_factory):
    vols, affine = make_phantom(shape=(40, 40, 16), spacing=(5.0, 5.0, 8.0), seed=5, grade="HGG")
    return write_study(vols, affine, tmp_path_factory.mktemp("src"), vendor="siemens", seed=5,
                       patient_name="LAYOUT^TEST", patient_id="LAY0001")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    volume, _, _ = _prepared_cases(tmp_path_factory.mktemp("prepared"))
    return volume


def _reason(family: str, roles: str) -> str:
    """A registry reason as the registry writes it: code name, roles, the checkpoint clause with its timestamp."""
    return (f"{family} runs on {roles}, all present; using {family}-r0-20260304T101112.pt, the newest of 1 valid "
            "checkpoint(s), created 2026-03-04T10:11:12.123456+00:00.")


def _decisions() -> list[Decision]:
    return [Decision("fs3dcnn", True, _reason("fs3dcnn", "T1+T1CE+T2+FLAIR")),
            Decision("promptnet", False, "promptnet does not run: it is the contrast-free path and T1CE is present, "
                                         "so fs3dcnn, mmdlm grade(s) the study instead."),
            Decision("crossmodal", False, "crossmodal does not run: no valid crossmodal checkpoint is registered."),
            Decision("mmdlm", True, _reason("mmdlm", "T1CE+T2+FLAIR"))]


def two_models(study, prepared: Path, training: dict) -> VersionResult:
    """Full-sequence 3D CNN and MMDLM (grade, IDH, 1p/19q; nine key slices) graded the study."""
    inputs = inputs_of(study, ["T1", "T1CE", "T2", "FLAIR"])
    by_role = {s.role: s for s in inputs}
    keys = [KeySlice(role, round(0.3 - 0.03 * k, 3), by_role[role].instances[5 + k])
            for k, role in zip(range(9), itertools.cycle(["T2", "FLAIR", "T1CE"]))]
    fs = ModelResult(
        family="fs3dcnn", paper="seed 000 (template network / 3D CNN FS-MRI)",
        checkpoint_name="fs3dcnn-r0-20260304T101112.pt", checkpoint_sha256="a1" * 32,
        checkpoint_created="2026-03-04T10:11:12Z", input_roles=["T1", "T1CE", "T2", "FLAIR"],
        reason=_reason("fs3dcnn", "T1+T1CE+T2+FLAIR"), tasks=[task("grade", "HGG", {"LGG": 0.2, "HGG": 0.8})],
        training_data=training, prepared_case=str(prepared),
        metrics={"test": {"auc": 0.912, "auc_ci": {"low": 0.84, "high": 0.97, "level": 0.95}, "sensitivity": 0.86,
                          "specificity": 0.81, "n": 74}, "val": {"auc": 0.9, "n": 20}},
        quality_flags=["registration to template: Dice 0.81 is under the training range 0.85-0.95"])
    mm = ModelResult(
        family="mmdlm", paper="seed 002 (MMDLM)", checkpoint_name="mmdlm-holdout-r0-20260304T101112.pt",
        checkpoint_sha256="b2" * 32, checkpoint_created="2026-03-04T10:11:12Z", input_roles=["T1CE", "T2", "FLAIR"],
        reason=_reason("mmdlm", "T1CE+T2+FLAIR"), key_slices=keys, training_data=training,
        tasks=[task("grade", "HGG", {"LGG": 0.125, "HGG": 0.875}),
               task("idh", "IDH-mutant", {"IDH-wildtype": 0.3, "IDH-mutant": 0.7}, calibrated=False),
               task("1p19q", "1p/19q-intact", {"1p/19q-intact": 0.6, "1p/19q-codeleted": 0.4})],
        metrics={"test": {"grade": {"auc": 0.88, "sensitivity": 0.9, "specificity": 0.7, "n": 20},
                          "idh": {"auc": 0.74, "n": 18}, "1p19q": {"auc": float("nan"), "n": 6}}})
    return VersionResult(study_instance_uid=study.study_instance_uid, study_id=3, version=1, inputs=inputs,
                         available_roles=["T1", "T1CE", "T2", "FLAIR"], missing_roles=[], decisions=_decisions(),
                         results=[fs, mm], quality_flags=["FLAIR has 16 slices (fewer than MMDLM's 24)"])


def _declined(family: str, sha: str, training: dict, reasons: list[GateReason]) -> Declined:
    return Declined(family=family, paper="seed 000 (template network / 3D CNN FS-MRI)",
                    checkpoint_name=f"{family}-r0-20260304T101112.pt", checkpoint_sha256=sha,
                    input_roles=["T1", "T1CE", "T2", "FLAIR"], reasons=reasons, training_data=training,
                    measurements={"brain_volume_ml": 2548.4, "slice_thickness_mm/T2": 5.5})


GATE = [GateReason("slice_thickness_mm/T2", 5.5, "mm", 0.75, 1.25,
                   "slice thickness (T2) 5.5 mm; this model was trained on 1.0\u20131.0 mm"),
        GateReason("brain_volume_ml", 2548.4, "ml", 1100.0, 1400.0,
                   "brain volume 2,548 ml; this model was trained on 1,100\u20131,400 ml")]


def cannot_grade(study, prepared: Path, training: dict) -> VersionResult:
    """Both selected models declined by the input gate: nothing graded."""
    declined = [dataclasses.replace(_declined("fs3dcnn", "a1" * 32, training, GATE), prepared_case=str(prepared)),
                _declined("mmdlm", "b2" * 32, training, GATE)]
    two = two_models(study, prepared, training)
    return dataclasses.replace(two, results=[], declined=declined, quality_flags=[],
                               cannot_grade="No model could grade this study. "
                               + " ".join(d.sentence() for d in declined))


def long_study(study, prepared: Path, training: dict) -> VersionResult:
    """What made real studies lose their last sections: many flags, long reasons, long series descriptions."""
    two = two_models(study, prepared, training)
    name = "t1_mprage_sag_p2_iso_1.0mm_post_contrast_gadovist_0.1mmol_per_kg_reformatted_axial_MPR"
    inputs = [dataclasses.replace(s, series_description=f"{name}_{s.role}_{'x' * 30}") for s in two.inputs]
    flags = [f"quality flag {i}: the bias field in FLAIR is strong and the template Dice 0.8{i} is under the "
             "training range 0.85-0.95" for i in range(9)]
    long_reason = GateReason("intensity_cv/FLAIR", 9.99, "1", 0.1, 0.2,
                             "intensity spread inside the brain (std/mean) (FLAIR) 9.99; this model was trained "
                             "on 0.10\u20130.20, far outside the range of every training case")
    declined = [_declined("promptnet", "c3" * 32, training, [long_reason] * 4 + GATE),
                _declined("crossmodal", "d4" * 32, training, [long_reason] * 4)]
    fs, mm = two.results
    return dataclasses.replace(
        two, inputs=inputs, quality_flags=flags, declined=declined,
        results=[dataclasses.replace(fs, quality_flags=flags[:4]), dataclasses.replace(mm, quality_flags=flags[4:])],
        gate_loosened="The input gate was loosened at this site: measurement ranges widened by 1000% of the "
                      "training range (default 25%).")


# --------------------------------------------------------------------------- checks
def _boxes_do_not_overlap(boxes: list[tuple[str, tuple[float, float, float, float]]]) -> None:
    for (a, (ax0, ay0, ax1, ay1)), (b, (bx0, by0, bx1, by1)) in itertools.combinations(boxes, 2):
        apart = ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        assert apart, f"{a!r} {(ax0, ay0, ax1, ay1)} overlaps {b!r} {(bx0, by0, bx1, by1)}"


def check_pages(pages: list[sm.Page]) -> None:
    """Every text box inside the page's margins, none overlapping another or the slice's frame; legible sizes."""
    for page in pages:
        boxes = []
        for t in page.texts:
            x0, y0, x1, y1 = t.box()
            if not t.text.strip():
                continue
            assert sm.MARGIN <= x0 and sm.MARGIN <= y0 and x1 <= sm.WIDTH - sm.MARGIN and y1 <= sm.HEIGHT - sm.MARGIN, \
                (page.number, t.text, (x0, y0, x1, y1))
            assert t.style.size >= sm.MIN_POINTS, (t.text, t.style.size)
            boxes.append((t.text, (x0, y0, x1, y1)))
        frame = page.frame_box()
        if frame is not None:
            assert sm.MARGIN <= frame[0] and sm.MARGIN <= frame[1], frame
            assert frame[2] <= sm.WIDTH - sm.MARGIN and frame[3] <= sm.HEIGHT - sm.MARGIN, frame
            boxes.append(("<slice frame>", frame))
        _boxes_do_not_overlap(boxes)
        for left, top, right, bottom, _ in page.fills:
            assert sm.MARGIN <= left and sm.MARGIN <= top and right <= sm.WIDTH - sm.MARGIN
            assert bottom <= sm.HEIGHT - sm.MARGIN


def check_pixels(images: list[np.ndarray]) -> None:
    """Nothing is drawn in the margin on any side (viewers put their own overlays there)."""
    m = sm.MARGIN
    for k, arr in enumerate(images, start=1):
        assert arr.shape == (sm.HEIGHT, sm.WIDTH, 3) and arr.dtype == np.uint8
        for name, band in (("top", arr[:m]), ("bottom", arr[-m:]), ("left", arr[:, :m]), ("right", arr[:, -m:])):
            assert not band.any(), f"image {k}: something drawn in the {name} margin"
        assert arr[m:-m, m:-m].any()


def flow_text(pages: list[sm.Page]) -> str:
    """Everything the pages say, without whitespace (wrapping adds and removes it)."""
    return "".join("".join(t.text.split()) for page in pages for t in page.texts)


def texts(pages: list[sm.Page]) -> str:
    """What the pages say, as one line: a wrapped sentence reads as it was written."""
    return " ".join(" ".join(t.text.split()) for page in pages for t in page.texts)


def save_examples(name: str, images: list[np.ndarray]) -> None:
    where = os.environ.get("DICOMNODE_SUMMARY_EXAMPLES")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        for k, arr in enumerate(images, start=1):
            Image.fromarray(arr).save(Path(where) / f"{name}-{k}.png")


def _amber(arr: np.ndarray) -> int:
    return int(np.all(arr == AMBER, axis=-1).sum())


def test_fonts_are_the_ones_the_layout_measures_with():
    """The page is measured and drawn with matplotlib's DejaVu Sans files: the same glyphs on every host."""
    for bold in (False, True):
        path = sm._FONT_DIR / sm._FONT_FILES[bold]
        assert path.is_file(), path
        assert Path(sm._font(sm.TextStyle(9, "#fff", bold)).path) == path
    # the advance-sum measure agrees with FreeType's own box of the drawn line (it may only be wider)
    style = sm.TextStyle(9, "#fff")
    line = "held-out: AUC 0.91 (95% CI 0.84\u20130.97), sens 0.86, spec 0.81, n=74 \u2014 VAWTY"
    drawn = sm._font(style).getbbox(line, anchor="la")[2]
    assert drawn <= sm._width(style, line) <= drawn + 3


def test_thresholds_chosen_on_validation_keep_the_two_model_study_on_one_image(study, prepared):
    """Real checkpoints store a threshold per task; saying so must not push the summary onto a second image."""
    result = two_models(study, prepared, SYNTHETIC)
    cuts = iter([0.62, 0.45, 0.38, 0.71])
    models = [dataclasses.replace(m, tasks=[dataclasses.replace(t, threshold=next(cuts), threshold_source="validation")
                                             for t in m.tasks]) for m in result.results]
    result = dataclasses.replace(result, results=models)
    pages = sm.layout(result, sm.choose_panel(result), algorithm_version=VERSION)
    assert len(pages) == 1
    flow = flow_text(pages)
    lines = [content.threshold_line(t) for m in result.results for t in m.tasks]
    assert [line.split(" threshold ")[1][:17] for line in lines] == [
        "0.62 (validation)", "0.45 (validation)", "0.38 (validation)", "0.71 (validation)"]
    for line in lines:
        assert "".join(line.split()) in flow, line


def test_two_model_study_fits_one_image_with_plain_names_and_the_warning(study, prepared, tmp_path):
    result = two_models(study, prepared, SYNTHETIC)
    panel = sm.choose_panel(result)
    assert panel is not None and panel.steps and "as Full-sequence 3D CNN saw it" in panel.caption
    pages = sm.layout(result, panel, algorithm_version=VERSION)
    assert len(pages) == 1  # what a clinician sees at a glance: one image
    check_pages(pages)
    images = [sm.render_page(p) for p in pages]
    check_pixels(images)
    save_examples("two-models", images)
    said = texts(pages)
    # the warning, near the top, on the amber banner
    banner = [t for t in pages[0].texts if content.SYNTHETIC_WARNING in t.text]
    assert len(banner) == 1 and banner[0].box()[1] < 100 and _amber(images[0]) > 10000
    # plain names, and no code name or paper label as a name
    for name in ("Full-sequence 3D CNN", "MMDLM", "Adaptive PromptNet (non-contrast)", "Cross-modality attention"):
        assert name in said, name
    assert not FREE_CODE_NAME.search(said), FREE_CODE_NAME.search(said)
    assert not [p for p in PAPERS if p in said]
    # the held-out performance, one line per model
    assert "held-out: AUC 0.91 (95% CI 0.84\u20130.97), sens 0.86, spec 0.81, n=74" in said
    assert "held-out: grade AUC 0.88, sens 0.90, spec 0.70, n=20; IDH AUC 0.74, n=18; 1p/19q AUC undefined, n=6" in said
    # the sections that used to vanish, complete: every line of the text column is on the page
    flow = flow_text(pages)
    for _, line in sm.summary_lines(result):
        assert "".join(line.split()) in flow, line
    assert "Grade: HGG" in said and "1p/19q: 1p/19q-intact" in said and "RAN: MMDLM runs on T1CE+T2+FLAIR" in said
    assert "newest of 1 valid" not in said  # the checkpoint-selection clause is the SR's
    assert "LAYOUT" not in said and "LAY0001" not in said  # no patient identity on the page

    # the objects: one valid SC, the SR valid; the terminal report lists the nine key slices once
    paths = write_reports(result, tmp_path, algorithm_version=VERSION, when=WHEN)
    assert [p.name for p in paths] == ["sr.dcm", "summary.dcm"]
    for p in paths:
        assert_valid(p)
    assert np.array_equal(pydicom.dcmread(paths[1]).pixel_array, images[0])
    report = describe(paths[0])
    keys = result.results[1].key_slices
    assert report.count("Key slices (9):") == 1
    for k in keys:
        assert report.count(k.ref.sop_instance_uid) == 1, k
    assert report.splitlines()[2] == "!! Trained on SYNTHETIC data - not for clinical use"
    assert "* Full-sequence 3D CNN  (checkpoint" in report and "* MMDLM  (checkpoint" in report
    assert not FREE_CODE_NAME.search(report) and not [p for p in PAPERS if p in report]


def test_no_warning_when_the_checkpoints_are_not_synthetic(study, prepared):
    result = two_models(study, prepared, SITE)
    pages = sm.layout(result, sm.choose_panel(result), algorithm_version=VERSION)
    check_pages(pages)
    said = texts(pages)
    assert "SYNTHETIC" not in said and not pages[0].fills
    assert "trained on: BraTS2020 training data, site copy (295 cases) (295 training cases)" in said
    assert _amber(sm.render_page(pages[0])) == 0
    # one synthetic model among site models: the warning names it
    mixed = dataclasses.replace(result, results=[result.results[0], dataclasses.replace(
        result.results[1], training_data=SYNTHETIC)])
    assert content.synthetic_warning(mixed) == content.SYNTHETIC_WARNING + ": MMDLM"


def test_cannot_grade_study_says_so_with_the_warning(study, prepared, tmp_path):
    result = cannot_grade(study, prepared, SYNTHETIC)
    pages = sm.layout(result, sm.choose_panel(result), algorithm_version=VERSION)
    assert len(pages) == 1
    check_pages(pages)
    images = [sm.render_page(p) for p in pages]
    check_pixels(images)
    save_examples("cannot-grade", images)
    said = texts(pages)
    assert "CANNOT GRADE" in said and content.SYNTHETIC_WARNING in said and _amber(images[0]) > 10000
    assert "Full-sequence 3D CNN: not graded" in said and "MMDLM: not graded" in said
    assert "not graded: slice thickness (T2) 5.5 mm; this model was trained on 1.0\u20131.0 mm" in said
    assert "Grade:" not in said and "P(" not in said and "held-out" not in said  # a declined model has no answer
    assert not FREE_CODE_NAME.search(said) and not [p for p in PAPERS if p in said]
    flow = flow_text(pages)
    for _, line in sm.summary_lines(result):
        assert "".join(line.split()) in flow, line
    # without a synthetic checkpoint: the same page, no warning
    plain = cannot_grade(study, prepared, SITE)
    assert content.SYNTHETIC_WARNING not in texts(sm.layout(plain, None, algorithm_version=VERSION))
    paths = write_reports(result, tmp_path, algorithm_version=VERSION, when=WHEN)
    for p in paths:
        assert_valid(p)
    report = describe(paths[0])
    assert "CANNOT GRADE: No model could grade this study. Full-sequence 3D CNN: slice thickness" in report
    assert not FREE_CODE_NAME.search(report)


def test_a_long_study_continues_on_a_second_image_and_loses_nothing(study, prepared, tmp_path):
    result = long_study(study, prepared, SYNTHETIC)
    pages = sm.layout(result, sm.choose_panel(result), algorithm_version=VERSION)
    assert 2 <= len(pages) <= sm.MAX_PAGES
    check_pages(pages)
    images = [sm.render_page(p) for p in pages]
    check_pixels(images)
    save_examples("long", images)
    n = len(pages)
    for page in pages:
        said = texts([page])
        assert f"image {page.number} of {n}" in said and content.SYNTHETIC_WARNING in said
        assert "Research use only. Not for diagnostic use." in said  # every image carries the disclaimer
        if page.number < n:
            assert f"continued on image {page.number + 1} of {n} in this series" in said
        if page.number > 1:
            assert f"(continued from image {page.number - 1} of {n})" in said and page.frame is None
    flow = flow_text(pages)
    for _, line in sm.summary_lines(result):
        assert "".join(line.split()) in flow, line  # nothing cut: every section, every flag, every reason
    for step in pages[0].panel.steps:
        assert "".join(step.split()) in flow, step
    # the first image keeps the answers; the rest follows
    first = texts(pages[:1])
    assert "Grade: HGG" in first and "held-out: AUC 0.91" in first

    paths = write_reports(result, tmp_path, algorithm_version=VERSION, when=WHEN)
    assert [p.name for p in paths] == ["sr.dcm"] + [summary_file(k) for k in range(1, n + 1)]
    scs = [pydicom.dcmread(p) for p in paths[1:]]
    for p in paths:
        assert_valid(p)
    assert len({ds.SeriesInstanceUID for ds in scs}) == 1 and len({ds.SOPInstanceUID for ds in scs}) == n
    assert [int(ds.InstanceNumber) for ds in scs] == list(range(1, n + 1))
    assert [ds.pixel_array.tobytes() for ds in scs] == [a.tobytes() for a in images]
    again = write_reports(result, tmp_path, algorithm_version=VERSION, when=WHEN)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # same pages, same UIDs, same bytes
    # the same version re-reported shorter: no stale continuation image is left to be sent
    short = write_reports(two_models(study, prepared, SYNTHETIC), tmp_path, algorithm_version=VERSION, when=WHEN)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in short) == ["sr.dcm", "summary.dcm"]
