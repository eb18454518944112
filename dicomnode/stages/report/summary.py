"""The Secondary Capture summary image: the report for viewers that cannot render SR.

Many PACS viewers show an SR as a wall of text or not at all; a single RGB
image with the result, the model path, what was missing, the disclaimer and a
key slice is what a radiologist actually sees. The slice is drawn with
matplotlib's Agg canvas directly (no pyplot, no global backend switch), the
text with FreeType through Pillow (matplotlib's copy of DejaVu Sans); both are
byte-for-byte reproducible, so the same result gives the same pixels.

"Show what the model saw": when the pipeline left the prepared case (the
arrays on the model's grid, ``ModelResult.prepared_case``), the picture is a
slice of THAT, not of the source series: the key slice (MMDLM) or the axial
slice through the brain-mask centre, with the outline of the brain mask the
model used and of the template brain (clinical specs), and one line per
preprocessing step (brain extraction volume, registration quality, ...). A
wrong brain mask or a failed registration is then visible at a glance. The
case is read with numpy alone (format ``dicomnode.case/1``), so the report
worker does not import torch. Without a prepared case (older results) the
source DICOM slice is shown as before.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import textwrap
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pydicom
from highdicom.sc import SCImage
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from dicomnode.handoff import Declined, InputSeries, KeySlice, ModelResult, VersionResult, family_title

from dicomnode.stages.report import content
from dicomnode.stages.report.sop import SC_SERIES_DESCRIPTION, SC_SERIES_NUMBER, stamp_time, read_example, report_uids

log = logging.getLogger(__name__)

WIDTH, HEIGHT, DPI = 1024, 768, 100
MAX_SCAN = 20000  # files looked at to find a slice: the spool directory of a busy day can be large
_PREFERRED_ROLES = ("T1CE", "FLAIR", "T2", "T1")
_TASK_TITLE = {"grade": "Grade", "idh": "IDH", "1p19q": "1p/19q"}


MASK_COLOUR = "#00e5ff"  # the case's brain mask, as the model used it
TEMPLATE_COLOUR = "#ff4fd8"  # the template's brain (atlas space)
CASE_FORMAT = "dicomnode.case/1"  # models.casefile.CASE_FORMAT (not imported: it would pull in torch)


@dataclass
class Panel:
    """The slice shown on the summary, and why that one."""

    pixels: np.ndarray  # 2-D, float
    caption: str
    key: bool  # True: a model's key slice; False: the middle slice of a series
    aspect: float = 1.0  # row spacing / column spacing, so anisotropic pixels are not drawn squashed
    outlines: list[tuple[np.ndarray, str, str]] = field(default_factory=list)  # (2-D bool, colour, label)
    steps: list[str] = field(default_factory=list)  # one line per preprocessing step of the shown case


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


# --------------------------------------------------------------------------- the prepared case


class _LazyArrays(Mapping[str, np.ndarray]):
    """A case's arrays by role, each read from the open ``.npz`` when first used.

    The summary shows one role of three or four, and each role's bag or
    volume is megabytes, CRC-checked as it is read: reading every role up
    front read (and checked) mostly arrays the page never shows.
    """

    def __init__(self, z: Any, roles: list[str]) -> None:
        self._z, self._roles, self._read = z, list(roles), {}

    def __getitem__(self, role: str) -> np.ndarray:
        if role not in self._roles:
            raise KeyError(role)
        if role not in self._read:
            self._read[role] = np.asarray(self._z[f"array/{role}"])
        return self._read[role]

    def __contains__(self, role: object) -> bool:  # Mapping's default would read the array
        return role in self._roles

    def __iter__(self) -> Iterator[str]:
        return iter(self._roles)

    def __len__(self) -> int:
        return len(self._roles)


@dataclass
class _Case:
    """The parts of a prepared case the summary draws (read from the .npz with numpy only)."""

    arrays: Mapping[str, np.ndarray]
    affine: np.ndarray
    meta: dict[str, Any]
    mask: np.ndarray | None
    template_mask: np.ndarray | None
    slice_indices: np.ndarray | None


@contextlib.contextmanager
def open_case(path: str | Path | None) -> Iterator[_Case | None]:
    """A prepared case written by ``models.casefile.save_case``, open while in use; None when missing or not one."""
    try:
        z = np.load(Path(path), allow_pickle=False) if path else None
    except Exception:  # gone or foreign: the summary falls back to the source series
        z = None
    if z is None:
        yield None
        return
    with z:
        try:
            header = json.loads(bytes(z["header.json"]).decode())
            get = {n: (np.asarray(z[n]) if n in z.files else None) for n in ("mask", "template_mask", "slice_indices")}
            case: _Case | None = _Case(
                arrays=_LazyArrays(z, list(header["roles"])), affine=np.asarray(z["affine"], dtype=np.float64),
                meta=dict(header.get("meta") or {}), mask=get["mask"], template_mask=get["template_mask"],
                slice_indices=get["slice_indices"]) if header.get("format") == CASE_FORMAT else None
        except Exception:  # truncated or foreign
            case = None
        yield case


def _orient(direction_rows: np.ndarray, direction_cols: np.ndarray) -> tuple[bool, bool, bool]:
    """(transpose, flip rows, flip cols) that put a slice the way a radiologist looks at it.

    Vertical: the axis closer to superior-inferior (else anterior-posterior),
    superior/anterior at the top. Horizontal: patient right on the viewer's
    left (radiological convention); anterior on the left for a sagittal slice.
    Directions are RAS world vectors of the two array axes.
    """
    a, b = np.abs(direction_rows), np.abs(direction_cols)

    def vertical_score(v: np.ndarray) -> float:
        return float(v[2]) * 2 + float(v[1])  # superior-inferior first, then anterior-posterior

    transpose = vertical_score(b) > vertical_score(a)
    rows, cols = (direction_cols, direction_rows) if transpose else (direction_rows, direction_cols)
    up = 2 if abs(rows[2]) >= abs(rows[1]) else 1
    flip_rows = rows[up] > 0  # index increases toward superior/anterior: flip so it is at the top
    c = np.abs(cols)
    flip_cols = cols[0] > 0 if c[0] >= c[1] else cols[1] > 0  # toward R (or A): flip so it is on the left
    return transpose, bool(flip_rows), bool(flip_cols)


def _apply(img: np.ndarray, how: tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_cols = how
    out = img.T if transpose else img
    if flip_rows:
        out = out[::-1, :]
    if flip_cols:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _nearest_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(size[0]) + 0.5) * img.shape[0] / size[0], img.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(size[1]) + 0.5) * img.shape[1] / size[1], img.shape[1] - 1).astype(int)
    return img[np.ix_(rows, cols)]


def _pick_role(arrays: Mapping[str, np.ndarray], wanted: str | None = None) -> str:
    if wanted in arrays:
        return str(wanted)
    return next((r for r in _PREFERRED_ROLES if r in arrays), next(iter(arrays)))


def _fmt_num(value: Any, decimals: int = 2) -> str:
    try:
        return f"{float(value):,.{decimals}f}"
    except (TypeError, ValueError):
        return str(value)


def step_lines(meta: dict[str, Any], measurements: dict[str, Any] | None = None) -> list[str]:
    """One line per preprocessing step of a prepared case: what it did and what it measured.

    E.g. "brain extraction (deepbet, on T1): 1,548 ml", "registration to template
    (mni152_2009): ok, MI 0.61, scale 1.02". Unknown steps get their name.
    """
    meas = dict(meta.get("measurements") or {})
    meas.update(measurements or {})
    transforms = list((meta.get("spec") or {}).get("transforms") or [])
    out: list[str] = []
    for i, step in enumerate(meta.get("steps") or []):
        name = str(step.get("name", "?"))
        params = transforms[i] if i < len(transforms) and transforms[i].get("name") == name else {}
        if name == "reorient":
            line = f"reorient to {step.get('to', 'RAS')}"
        elif name == "resample":
            shape = "x".join(str(n) for n in step.get("shape", []))
            line = f"resample to {'x'.join(_fmt_num(v, 1) for v in step.get('spacing', []))} mm (grid {shape})"
        elif name == "bias_field":
            roles = step.get("roles") or {}
            line = "bias-field correction (N4): " + (", ".join(roles) or "none")
        elif name == "brain_extract":
            volume = meas.get("brain_volume_ml", step.get("volume_ml"))
            line = f"brain extraction ({step.get('method', '?')}, on {step.get('role', '?')}): {_fmt_num(volume, 0)} ml"
            if step.get("method") == "nonzero" and "skull-stripped" in str(step.get("why", "")):
                line += " (input already skull-stripped)"
        elif name == "coregister":
            parts = []
            for role, r in (step.get("roles") or {}).items():
                mi = meas.get(f"coregister_mi/{role}")
                if r.get("registered"):
                    parts.append(f"{role} registered" + (f", MI {_fmt_num(mi)}" if mi is not None else ""))
                else:
                    parts.append(f"{role} on the reference grid")
            line = f"co-registration to {step.get('reference', '?')}: " + ("; ".join(parts) or "nothing to do")
        elif name == "atlas_register":
            how = "ok" if step.get("registered") else "input in template space, resampled"
            got = {k: meas.get(k, step.get(k)) for k in ("atlas_mi", "atlas_dice", "atlas_scale")}
            line = (f"registration to template ({step.get('template', '?')}): {how}"
                    + "".join(f", {label} {_fmt_num(got[k])}" for k, label in
                              (("atlas_mi", "MI"), ("atlas_dice", "Dice"), ("atlas_scale", "scale"))
                              if got[k] is not None))
        elif name == "brain_mask":
            method = params.get("method", "nonzero")
            line = f"brain mask ({method}): {int(step.get('voxels', 0)):,} voxels"
        elif name == "crop_or_pad":
            box = step.get("box") or []
            line = "crop/pad to " + "x".join(str(int(b) - int(a)) for a, b in box)
            if step.get("brain_truncated"):
                line += " - BRAIN CUT"
        elif name == "normalize":
            line = f"intensity normalisation ({step.get('method', '?')} in {step.get('where', '?')})"
        elif name == "transpose":
            line = f"axes reordered {step.get('axes')}"
        else:
            line = name.replace("_", " ")
        out.append(line)
    sl = meta.get("slices")
    if sl:
        out.append(f"slices: {sl.get('real', '?')} of a bag of {sl.get('count', '?')} (axis {sl.get('axis', '?')})")
    return out


def _volume_panel(case: _Case, title: str, measurements: dict[str, Any]) -> Panel:
    role = _pick_role(case.arrays)
    vol = case.arrays[role]
    dirs = case.affine[:3, :3]
    axis = int(np.argmax(np.abs(dirs[2]) / np.maximum(np.linalg.norm(dirs, axis=0), 1e-9)))  # closest to S-I
    if case.mask is not None and case.mask.shape == vol.shape and case.mask.any():
        index = int(round(float(np.nonzero(case.mask)[axis].mean())))
    else:
        index = vol.shape[axis] // 2
    a, b = [k for k in range(3) if k != axis]
    how = _orient(dirs[:, a], dirs[:, b])
    sizes = np.linalg.norm(dirs, axis=0)
    row_size, col_size = (sizes[b], sizes[a]) if how[0] else (sizes[a], sizes[b])
    outlines = []
    for m, colour, label in ((case.mask, MASK_COLOUR, "brain mask"),
                             (case.template_mask, TEMPLATE_COLOUR, "template brain")):
        if m is not None and m.shape == vol.shape:
            outlines.append((_apply(np.take(m, index, axis=axis).astype(bool), how), colour, label))
    grid = "template grid" if case.template_mask is not None else "model grid"
    return Panel(_apply(np.take(vol, index, axis=axis).astype(np.float32), how),
                 f"{role} as {title} saw it ({grid}, slice {index} through the brain centre)", False,
                 float(row_size / col_size) if col_size > 0 else 1.0, outlines,
                 step_lines(case.meta, measurements))


def _slice_panel(case: _Case, title: str, measurements: dict[str, Any], key: KeySlice | None) -> Panel | None:
    """A bag slice of a slice model's case (its key slice, or the slice nearest the brain centre)."""
    sl = case.meta.get("slices") or {}
    shape = case.meta.get("shape")
    if case.slice_indices is None or not shape:
        return None
    axis = int(sl.get("axis", 2))
    indices = [int(i) for i in np.asarray(case.slice_indices).tolist()]
    if key is not None and key.grid_index in indices:
        position, grid_index = indices.index(int(key.grid_index)), int(key.grid_index)
        role = _pick_role(case.arrays, key.role)
    else:
        real = [i for i in indices if i >= 0]
        if not real:
            return None
        centre = (float(np.nonzero(case.mask)[axis].mean()) if case.mask is not None and case.mask.any()
                  else float(np.mean(real)))
        grid_index = min(real, key=lambda i: (abs(i - centre), i))
        position, key = indices.index(grid_index), None
        role = _pick_role(case.arrays)
    img = case.arrays[role][position]
    dirs = case.affine[:3, :3]
    a, b = [k for k in range(3) if k != axis]
    how = _orient(dirs[:, a], dirs[:, b])
    sizes = np.linalg.norm(dirs, axis=0)
    # each bag slice is the grid slice resized to the model's slice size: its pixels are that much larger
    rs, cs = sizes[a] * int(shape[a]) / img.shape[0], sizes[b] * int(shape[b]) / img.shape[1]
    row_size, col_size = (cs, rs) if how[0] else (rs, cs)
    outlines = []
    for m, colour, label in ((case.mask, MASK_COLOUR, "brain mask"),
                             (case.template_mask, TEMPLATE_COLOUR, "template brain")):
        if m is not None and m.ndim == 3 and 0 <= grid_index < m.shape[axis]:
            plane = np.take(m, grid_index, axis=axis).astype(bool)
            outlines.append((_apply(_nearest_resize(plane, img.shape), how), colour, label))
    caption = (f"Key slice ({role}) as {title} saw it, attention {key.attention:.2f}" if key is not None
               else f"{role} as {title} saw it (slice {grid_index} of its grid)")
    return Panel(_apply(img.astype(np.float32), how), caption, key is not None,
                 float(row_size / col_size) if col_size > 0 else 1.0, outlines, step_lines(case.meta, measurements))


def prepared_panel(result: VersionResult) -> Panel | None:
    """A slice of a prepared case: the key slice's model first, then graded models, then declined ones."""
    key = _key_slice(result)
    records: list[ModelResult | Declined] = [*result.results, *result.declined]
    if key is not None:
        owner = next((m for m in result.results if key in m.key_slices), None)
        if owner is not None:
            records = [owner, *[r for r in records if r is not owner]]
    for record in records:
        with open_case(record.prepared_case) as case:
            if case is None or not case.arrays:
                continue
            panel = _case_panel(case, record, key, result.study_id)
        if panel is not None:
            return panel
    return None


def _case_panel(case: _Case, record: ModelResult | Declined, key: KeySlice | None, study_id: int) -> Panel | None:
    """The slice of one prepared case: its key slice (a slice model's bag) or the brain centre (a volume)."""
    try:
        first = case.arrays[next(iter(case.arrays))]
        if case.slice_indices is not None and first.ndim == 3 and case.meta.get("slices"):
            own_key = key if isinstance(record, ModelResult) and key in record.key_slices else None
            return _slice_panel(case, record.family, record.measurements, own_key)
        if first.ndim == 3:
            return _volume_panel(case, record.family, record.measurements)
        return None
    except Exception as exc:  # a picture must never fail the report
        log.warning("prepared case of %s could not be drawn for study %s: %s", record.family, study_id,
                    type(exc).__name__)
        return None


def choose_panel(result: VersionResult) -> Panel | None:
    """What the model saw (a prepared case), else the source key slice or middle T1CE/FLAIR slice, else nothing."""
    panel = prepared_panel(result)
    if panel is not None:
        return panel
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
    """(style, text) lines of the summary panel; also what tests read to check the picture says it.

    A model the gate declined is shown as "not graded: <reason>", never with a
    class or a probability.
    """
    lines: list[tuple[str, str]] = []
    if result.cannot_grade or not result.results:
        lines.append(("alert", "CANNOT GRADE"))
        lines.append(("body", "No model could grade this study." if result.declined else
                      (result.cannot_grade or "no model produced a result")))
    if result.gate_loosened:
        lines.append(("warn", result.gate_loosened))
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
    for d in result.declined:
        lines.append(("head", f"{family_title(d.family)}  ({d.family})"))
        for r in d.reasons:
            lines.append(("warn", f"not graded: {r.reason}"))
        lines.append(("small", f"checkpoint {d.checkpoint_name}  sha256 {d.checkpoint_sha256[:12]}"))
    lines.append(("head", "Model path"))
    declined = {d.family for d in result.declined}
    for d in result.decisions:
        state = "DECLINED by the gate" if d.family in declined else "RAN" if d.runs else "not run"
        lines.append(("small", f"{state}: {d.reason}"))
    lines.append(("head", "Inputs"))
    lines.append(("small", "available: " + (", ".join(result.available_roles) or "none")))
    lines.append(("small", "missing: " + (", ".join(result.missing_roles) or "none")))
    for flag in result.quality_flags:
        lines.append(("warn", f"quality: {flag}"))
    if result.supersedes is not None:
        lines.append(("small", f"Replaces the report of study version {result.supersedes.version}."))
    return lines


@dataclass(frozen=True)
class TextStyle:
    """How a line of the page is drawn: size in points (at :data:`DPI`), colour, weight."""

    size: float
    colour: str
    bold: bool = False

    @property
    def pixels(self) -> float:
        return self.size * DPI / 72


_STYLE: dict[str, TextStyle] = {
    "alert": TextStyle(20, "#ff5050", True),
    "head": TextStyle(12, "#9fd3ff", True),
    "result": TextStyle(14, "#ffffff", True),
    "body": TextStyle(11, "#ffffff"),
    "small": TextStyle(9, "#dddddd"),
    "warn": TextStyle(9, "#ffcc44"),
}
_WRAP = {"alert": 40, "head": 50, "result": 48, "body": 60, "small": 76, "warn": 76}
_STEP = {"alert": 0.045, "head": 0.036, "result": 0.034, "body": 0.03, "small": 0.025, "warn": 0.025}
_TITLE = TextStyle(16, "#ff5050", True)
_CAPTION = TextStyle(8, "#ffffff")
_NO_IMAGE = TextStyle(10, "#ffffff")
_STEP_TEXT = TextStyle(7.5, "#cccccc")
_FOOTER, _FOOTER_LAST = TextStyle(9, "#ffcc44"), TextStyle(9, "#aaaaaa")
_CAPTION_PAD = 6 * DPI / 72  # matplotlib's title pad (6 pt), kept from when the caption was an axes title

_STEP_WRAP, _STEP_STEP, _STEP_TOP, _STEP_BOTTOM = 72, 0.019, 0.335, 0.185
#: the steps the image shows first (what a reader checks: was the brain found, did it land on the template);
#: routine ones (reorient, the mask's voxel count, normalisation) only when there is room
_STEP_PRIORITY = ("brain extraction", "registration to template", "co-registration", "bias-field", "crop/pad",
                  "slices:", "resample")

# matplotlib's own copy of DejaVu Sans (what the page used when matplotlib drew its text): the same
# file on every host with this matplotlib, so the same result gives the same pixels everywhere
_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
_FONT_FILES = {False: "DejaVuSans.ttf", True: "DejaVuSans-Bold.ttf"}
_fonts = threading.local()


def _font(style: TextStyle) -> ImageFont.FreeTypeFont:
    """The FreeType font of a style, one per thread: FreeType faces must not be shared between threads.

    Loading one costs a fraction of a millisecond; the layout engine is
    Pillow's BASIC one, so the glyph positions do not depend on whether the
    host's Pillow was built with libraqm. Sizes are fractional pixels
    (Pillow >= 10.1), as matplotlib's were: 9 pt at 100 dpi is 12.5 px.
    """
    cache: dict[tuple[float, bool], ImageFont.FreeTypeFont] | None = getattr(_fonts, "by_style", None)
    if cache is None:
        cache = _fonts.by_style = {}
    key = (style.pixels, style.bold)
    font = cache.get(key)
    if font is None:
        font = cache[key] = ImageFont.truetype(str(_FONT_DIR / _FONT_FILES[style.bold]), key[0],
                                               layout_engine=ImageFont.Layout.BASIC)
    return font


@dataclass(frozen=True)
class PageText:
    """One line of text on the page: its anchor point in pixels from the top left, and how it is drawn."""

    x: float
    y: float
    text: str
    style: TextStyle
    anchor: str = "la"  # Pillow's anchors: "la" left/ascender (matplotlib's va="top"), "ms", "mm"

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the drawn text in pixels."""
        left, top, right, bottom = _font(self.style).getbbox(self.text, anchor=self.anchor)
        return self.x + left, self.y + top, self.x + right, self.y + bottom


@dataclass(frozen=True)
class Page:
    """The summary page before drawing: where the slice goes and every line of text."""

    panel: Panel | None
    frame: tuple[float, float, float, float]  # the slice's box: (left, bottom, width, height), figure fractions
    texts: list[PageText]


def _essential(steps: list[str]) -> list[str]:
    """The step lines in the order a reader needs them; routine steps last."""
    def rank(line: str) -> int:
        return next((i for i, p in enumerate(_STEP_PRIORITY) if line.startswith(p)), len(_STEP_PRIORITY))

    return sorted(steps, key=rank)


def _wrap(text: str, width: int, x: float, right: float, style: TextStyle, *, indent: str = "") -> list[str]:
    """``text`` wrapped at ``width`` characters, narrower until every line, as drawn, ends left of ``right``.

    Character counts alone let wide glyphs (capitals, long hashes) run off the
    page; measuring with the font that draws the line is exact and
    deterministic. ``x`` and ``right`` are figure fractions.
    """
    font = _font(style)
    limit = right * WIDTH - x * WIDTH
    parts = textwrap.wrap(text, width, subsequent_indent=indent) or [""]
    while width > 8:
        if all(font.getbbox(part, anchor="la")[2] <= limit for part in parts):
            return parts
        width -= max(2, width // 10)
        parts = textwrap.wrap(text, width, subsequent_indent=indent) or [""]
    return parts


def _drawn(panel: Panel) -> list[tuple[np.ndarray, str, str]]:
    """The outlines that can be drawn on the panel (same shape as the slice, not empty)."""
    return [(o, colour, label) for o, colour, label in panel.outlines
            if o.shape == panel.pixels.shape and o.any()]


def _fit(box: tuple[float, float, float, float], panel: Panel) -> tuple[float, float, float, float]:
    """The part of ``box`` the slice fills at its aspect ratio, centred (what matplotlib's imshow did)."""
    left, bottom, width, height = box
    h, w = panel.pixels.shape
    want = h * panel.aspect / w  # drawn height / drawn width
    bw, bh = width * WIDTH, height * HEIGHT
    if bh / bw > want:
        fitted = bw * want / HEIGHT
        return left, bottom + (height - fitted) / 2, width, fitted
    fitted = bh / want / WIDTH
    return left + (width - fitted) / 2, bottom, fitted, height


def _at(x: float, y: float, text: str, style: TextStyle, anchor: str = "la") -> PageText:
    """A line placed in figure fractions (origin bottom left, as the layout below was designed)."""
    return PageText(x * WIDTH, (1 - y) * HEIGHT, text, style, anchor)


def layout(result: VersionResult, panel: Panel | None, *, algorithm_version: str) -> Page:
    """Where everything goes: the slice's box and every line of text (wrapped, measured, placed)."""
    texts = [_at(0.02, 0.965, "Glioma grading - RESEARCH USE ONLY, NOT FOR DIAGNOSTIC USE", _TITLE)]
    with_steps = panel is not None and bool(panel.steps or panel.outlines)
    box = (0.02, 0.37, 0.42, 0.5) if with_steps else (0.02, 0.2, 0.42, 0.67)
    frame = _fit(box, panel) if panel is not None else box
    left, bottom, width, height = frame
    if panel is not None:
        caption = _wrap(panel.caption, 72, 0.02, 0.45, _CAPTION)[:2]
        centre, base = (left + width / 2) * WIDTH, (1 - bottom - height) * HEIGHT - _CAPTION_PAD
        step = 1.2 * _CAPTION.pixels  # matplotlib's line spacing
        texts += [PageText(centre, base - (len(caption) - 1 - i) * step, line, _CAPTION, "ms")
                  for i, line in enumerate(caption)]
    else:
        texts.append(_at(left + width / 2, bottom + height / 2, "no source image available", _NO_IMAGE, "mm"))
    if with_steps and panel is not None:
        y = _STEP_TOP
        legend = [(colour, label) for _, colour, label in _drawn(panel)]
        if legend:
            x = 0.02
            for colour, label in legend:
                texts.append(_at(x, y, f"— {label}", TextStyle(8, colour)))
                x += 0.16
            y -= _STEP_STEP
        lines = ["Preprocessing (what the model saw):"] + [f"  {line}" for line in _essential(panel.steps)]
        parts = [part for line in lines for part in _wrap(line, _STEP_WRAP, 0.02, 0.45, _STEP_TEXT, indent="    ")]
        room = max(1, int((y - _STEP_BOTTOM) / _STEP_STEP) + 1)
        if len(parts) > room:  # never cut silently: say where the rest is
            parts = parts[: room - 1] + ["  ... (every step and measurement is in the SR)"]
        for part in parts:
            texts.append(_at(0.02, y, part, _STEP_TEXT))
            y -= _STEP_STEP

    y = 0.9
    for style, text in summary_lines(result):
        for part in _wrap(text, _WRAP[style], 0.47, 0.99, _STYLE[style]):
            if y < 0.2:
                break
            texts.append(_at(0.47, y, part, _STYLE[style]))
            y -= _STEP[style]

    footer = _wrap(content.DISCLAIMER_TEXT, 135, 0.02, 0.99, _FOOTER)
    footer.append(f"dicomnode {algorithm_version}; study version {result.version}. "
                  "The structured report (SR) in this study holds the full detail.")
    for i, part in enumerate(footer):
        texts.append(_at(0.02, 0.16 - i * 0.03, part, _FOOTER if i < len(footer) - 1 else _FOOTER_LAST))
    return Page(panel, frame, texts)


def _slice_pixels(page: Page) -> np.ndarray:
    """The page without its text, as (HEIGHT, WIDTH, 3) uint8: black, with the slice in its box.

    matplotlib draws the slice (nearest-neighbour pixels, the masks' contours,
    the frame) on an Agg canvas; it no longer draws text, which it renders
    glyph by glyph in Python (two thirds of the summary's time for ~40 lines).
    """
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes(page.frame)
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    panel = page.panel
    if panel is not None:
        lo, hi = np.percentile(panel.pixels, [1, 99.5])
        ax.imshow(panel.pixels, cmap="gray", vmin=float(lo), vmax=float(max(hi, lo + 1)),
                  interpolation="nearest", aspect="auto")
        h, w = panel.pixels.shape
        # the marker says "this is the slice the model attended to"; attention is per slice, not per voxel,
        # so the box frames the slice instead of pretending to localise the tumour
        for outline, colour, _ in _drawn(panel):
            # padded with False, so a mask that fills the whole slice (a head taken for the brain) is
            # outlined along the image border instead of not at all
            z = np.pad(outline, 1).astype(np.float32)
            ax.contour(np.arange(-1, w + 1), np.arange(-1, h + 1), z, levels=[0.5], colors=[colour],
                       linewidths=1.2)
        ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, lw=4,
                               edgecolor="#ffcc00" if panel.key else "#66aaff"))
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    for spine in ax.spines.values():
        spine.set_color("#444444")
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def render(result: VersionResult, panel: Panel | None, *, algorithm_version: str) -> np.ndarray:
    """The summary as an (HEIGHT, WIDTH, 3) uint8 RGB array: the slice by matplotlib, the text by FreeType."""
    page = layout(result, panel, algorithm_version=algorithm_version)
    image = Image.fromarray(np.ascontiguousarray(_slice_pixels(page)), mode="RGB")
    draw = ImageDraw.Draw(image)
    for t in page.texts:
        draw.text((t.x, t.y), t.text, font=_font(t.style), fill=t.style.colour, anchor=t.anchor)
    return np.ascontiguousarray(np.asarray(image), dtype=np.uint8)


def build_summary(result: VersionResult, *, algorithm_version: str, manufacturer: str = "dicomnode",
                  when: _dt.datetime | None = None, uid_prefix: str | None = None) -> Dataset:
    """A Secondary Capture image (RGB) in the source study, in its own deterministic series."""
    sc = summary_from_example(result, read_example(result), choose_panel(result), algorithm_version=algorithm_version,
                              manufacturer=manufacturer, when=when, uid_prefix=uid_prefix)
    log.info("built summary image for study %s version %s", result.study_id, result.version)
    return sc


def summary_from_example(result: VersionResult, example: Dataset, panel: Panel | None, *, algorithm_version: str,
                         manufacturer: str = "dicomnode", when: _dt.datetime | None = None,
                         uid_prefix: str | None = None) -> Dataset:
    """:func:`build_summary` with the source header read and the slice chosen by the caller.

    ``write_reports`` reads the header once for both objects; ``warm`` passes
    a tiny synthetic header and panel, so warming reads no file.
    """
    when = when or _dt.datetime.now()
    uids = report_uids(result, prefix=uid_prefix)
    pixels = render(result, panel, algorithm_version=algorithm_version)
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
    log.debug("built summary image for study %s version %s", result.study_id, result.version)
    return sc
