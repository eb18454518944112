"""The Secondary Capture summary image: the report for viewers that cannot render SR.

Many PACS viewers show an SR as a wall of text or not at all; a single RGB
image with the result, the model path, what was missing, the disclaimer and a
key slice is what a radiologist actually sees. It is drawn with matplotlib's
Agg canvas directly (no pyplot, no global backend switch), whose output is
byte-for-byte reproducible, so the same result gives the same pixels.
"""
from __future__ import annotations

import datetime as _dt
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from highdicom.sc import SCImage
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pydicom.dataset import Dataset

from dicomnode.pipeline.results import InputSeries, KeySlice, VersionResult

from . import content
from .sop import SC_SERIES_DESCRIPTION, SC_SERIES_NUMBER, stamp_time, read_example, report_uids

log = logging.getLogger(__name__)

WIDTH, HEIGHT, DPI = 1024, 768, 100
MAX_SCAN = 20000  # files looked at to find a slice: the spool directory of a busy day can be large
_PREFERRED_ROLES = ("T1CE", "FLAIR", "T2", "T1")
_TASK_TITLE = {"grade": "Grade", "idh": "IDH", "1p19q": "1p/19q"}


@dataclass
class Panel:
    """The slice shown on the summary, and why that one."""

    pixels: np.ndarray  # 2-D, float
    caption: str
    key: bool  # True: a model's key slice; False: the middle slice of a series
    aspect: float = 1.0  # row spacing / column spacing, so anisotropic pixels are not drawn squashed


def _candidates(series: InputSeries) -> list[Path]:
    """The series' own files when the pipeline listed them; else the example file's folder (scanned, bounded)."""
    if series.files:
        return [Path(f) for f in series.files]
    example = Path(series.example_file)
    if not example.parent.is_dir():
        return []
    files = sorted(p for p in example.parent.iterdir() if p.is_file())[:MAX_SCAN]
    return [example] + [p for p in files if p != example]


def _header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True,
                               specific_tags=["SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient",
                                              "ImageOrientationPatient", "InstanceNumber", "NumberOfFrames"])
    except Exception:  # not DICOM, or unreadable: not ours to judge here
        return None


def _aspect(ds: Dataset) -> float:
    """Row/column pixel spacing from the classic attribute or the enhanced shared functional group."""
    spacing = ds.get("PixelSpacing")
    if spacing is None:
        try:
            spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            return 1.0
    try:
        ratio = float(spacing[0]) / float(spacing[1])
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return 1.0
    return ratio if 0.1 < ratio < 10 else 1.0


def _frame(path: Path, frame: int | None) -> tuple[np.ndarray, float]:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 3 and "NumberOfFrames" in ds and int(ds.NumberOfFrames) > 1:
        arr = arr[(frame or (arr.shape[0] // 2 + 1)) - 1]
    elif arr.ndim != 2:
        raise ValueError(f"expected a monochrome image, got shape {arr.shape}")
    return arr, _aspect(ds)


def _key_slice(result: VersionResult) -> KeySlice | None:
    keys = [k for m in result.results for k in m.key_slices]
    return max(keys, key=lambda k: (k.attention, k.ref.sop_instance_uid)) if keys else None


def _find_key(result: VersionResult, key: KeySlice) -> Panel | None:
    for series in result.inputs:
        if series.series_instance_uid != key.ref.series_instance_uid:
            continue
        listed = {r.sop_instance_uid: Path(f) for r, f in zip(series.instances, series.files)}
        direct = listed.get(key.ref.sop_instance_uid)
        for path in [direct] if direct is not None else _candidates(series):
            h = _header(path)
            if h is not None and str(h.get("SOPInstanceUID", "")) == key.ref.sop_instance_uid:
                frame = f", frame {key.ref.frame}" if key.ref.frame else ""
                pixels, aspect = _frame(path, key.ref.frame)
                return Panel(pixels, f"Key slice ({key.role}{frame}), attention {key.attention:.2f}", True, aspect)
    return None


def _middle(series: InputSeries) -> Panel | None:
    """The middle slice along the slice normal (classic) or the middle frame (enhanced)."""
    found: list[tuple[float, Path]] = []
    for path in _candidates(series):
        h = _header(path)
        if h is None or str(h.get("SeriesInstanceUID", "")) != series.series_instance_uid:
            continue
        if int(h.get("NumberOfFrames", 1) or 1) > 1:
            pixels, aspect = _frame(path, None)
            return Panel(pixels, f"Middle frame of {series.role}", False, aspect)
        try:
            iop = np.array([float(v) for v in h.ImageOrientationPatient])
            pos = float(np.dot(np.cross(iop[:3], iop[3:]), [float(v) for v in h.ImagePositionPatient]))
        except (AttributeError, ValueError, TypeError):
            pos = float(h.get("InstanceNumber", 0) or 0)
        found.append((pos, path))
    if not found:
        return None
    found.sort()
    pixels, aspect = _frame(found[len(found) // 2][1], None)
    return Panel(pixels, f"Middle slice of {series.role}", False, aspect)


def choose_panel(result: VersionResult) -> Panel | None:
    """The model's key slice if there is one, else the middle T1CE/FLAIR slice, else nothing."""
    key = _key_slice(result)
    if key is not None:
        try:
            panel = _find_key(result, key)
        except Exception as exc:  # the summary must not fail the report over a picture
            log.warning("key slice could not be read for study %s: %s", result.study_id, type(exc).__name__)
            panel = None
        if panel is not None:
            return panel
    by_role = {s.role: s for s in result.inputs}
    for role in _PREFERRED_ROLES:
        if role in by_role:
            try:
                panel = _middle(by_role[role])
            except Exception as exc:
                log.warning("middle slice of %s unreadable for study %s: %s", role, result.study_id,
                            type(exc).__name__)
                panel = None
            if panel is not None:
                return panel
    return None


def summary_lines(result: VersionResult) -> list[tuple[str, str]]:
    """(style, text) lines of the summary panel; also what tests read to check the picture says it."""
    lines: list[tuple[str, str]] = []
    if result.cannot_grade or not result.results:
        lines.append(("alert", "CANNOT GRADE"))
        lines.append(("body", result.cannot_grade or "no model produced a result"))
    for m in result.results:
        lines.append(("head", f"{m.family}  ({m.paper})"))
        for t in m.tasks:
            probs = ", ".join(f"P({k}) = {v:.2f}" for k, v in t.probabilities.items())
            title = _TASK_TITLE.get(t.task, t.task)
            lines.append(("result", f"{title}: {t.label}  (P = {t.probabilities.get(t.label, t.probability):.2f})"))
            lines.append(("small", probs + ("; calibrated" if t.calibrated else "; not calibrated")))
        lines.append(("small", f"checkpoint {m.checkpoint_name}  sha256 {m.checkpoint_sha256[:12]}"))
        for flag in m.quality_flags:
            lines.append(("warn", f"quality: {flag}"))
    lines.append(("head", "Model path"))
    for d in result.decisions:
        lines.append(("small", f"{'RAN' if d.runs else 'not run'}: {d.reason}"))
    lines.append(("head", "Inputs"))
    lines.append(("small", "available: " + (", ".join(result.available_roles) or "none")))
    lines.append(("small", "missing: " + (", ".join(result.missing_roles) or "none")))
    for flag in result.quality_flags:
        lines.append(("warn", f"quality: {flag}"))
    if result.supersedes is not None:
        lines.append(("small", f"Replaces the report of study version {result.supersedes.version}."))
    return lines


_STYLE = {
    "alert": dict(fontsize=20, color="#ff5050", weight="bold"),
    "head": dict(fontsize=12, color="#9fd3ff", weight="bold"),
    "result": dict(fontsize=14, color="white", weight="bold"),
    "body": dict(fontsize=11, color="white"),
    "small": dict(fontsize=9, color="#dddddd"),
    "warn": dict(fontsize=9, color="#ffcc44"),
}
_WRAP = {"alert": 40, "head": 50, "result": 48, "body": 60, "small": 76, "warn": 76}
_STEP = {"alert": 0.045, "head": 0.036, "result": 0.034, "body": 0.03, "small": 0.025, "warn": 0.025}


def render(result: VersionResult, panel: Panel | None, *, algorithm_version: str) -> np.ndarray:
    """The summary as an (HEIGHT, WIDTH, 3) uint8 RGB array."""
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    fig.text(0.02, 0.965, "Glioma grading - RESEARCH USE ONLY, NOT FOR DIAGNOSTIC USE",
             fontsize=16, color="#ff5050", weight="bold", va="top")

    ax = fig.add_axes((0.02, 0.2, 0.42, 0.7))
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    if panel is not None:
        lo, hi = np.percentile(panel.pixels, [1, 99.5])
        ax.imshow(panel.pixels, cmap="gray", vmin=float(lo), vmax=float(max(hi, lo + 1)),
                  interpolation="nearest", aspect=panel.aspect)
        h, w = panel.pixels.shape
        # the marker says "this is the slice the model attended to"; attention is per slice, not per voxel,
        # so the box frames the slice instead of pretending to localise the tumour
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, lw=4,
                               edgecolor="#ffcc00" if panel.key else "#66aaff"))
        ax.set_title(panel.caption, color="white", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no source image available", color="white", ha="center", va="center",
                transform=ax.transAxes)
    for spine in ax.spines.values():
        spine.set_color("#444444")

    y = 0.9
    for style, text in summary_lines(result):
        for part in textwrap.wrap(text, _WRAP[style]) or [""]:
            if y < 0.2:
                break
            fig.text(0.47, y, part, va="top", **_STYLE[style])
            y -= _STEP[style]

    footer = textwrap.wrap(content.DISCLAIMER_TEXT, 135)
    footer.append(f"dicomnode {algorithm_version}; study version {result.version}. "
                  "The structured report (SR) in this study holds the full detail.")
    for i, part in enumerate(footer):
        fig.text(0.02, 0.16 - i * 0.03, part, fontsize=9, color="#ffcc44" if i < len(footer) - 1 else "#aaaaaa",
                 va="top")
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)


def build_summary(result: VersionResult, *, algorithm_version: str, manufacturer: str = "dicomnode",
                  when: _dt.datetime | None = None, uid_prefix: str | None = None) -> Dataset:
    """A Secondary Capture image (RGB) in the source study, in its own deterministic series."""
    when = when or _dt.datetime.now()
    uids = report_uids(result, prefix=uid_prefix)
    example = read_example(result)
    pixels = render(result, choose_panel(result), algorithm_version=algorithm_version)
    sc = SCImage.from_ref_dataset(
        ref_dataset=example,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids["sc_series"],
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids["sc_sop"],
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=("L", "P"),  # required by highdicom for PATIENT; blanked below
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=SC_SERIES_DESCRIPTION,
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        software_versions=algorithm_version,
    )
    # a rendered page has no patient orientation; Type 2 lets us say "unknown" instead of lying
    sc.PatientOrientation = None
    # General Series Laterality is Type 2C on a paired body part: naming the (unpaired) part lets it be absent
    sc.BodyPartExamined = str(example.get("BodyPartExamined") or "BRAIN")
    sc.BurnedInAnnotation = "NO"  # the page carries results, never patient identity
    sc.ImageComments = "Research use only. Not for diagnostic use."
    stamp_time(sc, when, date_attrs=[("InstanceCreationDate", "InstanceCreationTime"),
                                 ("DateOfSecondaryCapture", "TimeOfSecondaryCapture")])
    log.info("built summary image for study %s version %s", result.study_id, result.version)
    return sc
