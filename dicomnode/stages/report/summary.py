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
import dataclasses
import datetime as _dt
import json
import logging
import re
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
from dicomnode.stages.report.sop import (
    SC_SERIES_DESCRIPTION,
    SC_SERIES_NUMBER,
    read_example,
    report_uids,
    stamp_time,
    summary_page_uid,
)

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
            return _slice_panel(case, family_title(record.family), record.measurements, own_key)
        if first.ndim == 3:
            return _volume_panel(case, family_title(record.family), record.measurements)
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


def _trained_on(training_data: dict[str, Any]) -> tuple[str, str]:
    """The "trained on" line of a model: warning colour when its checkpoint says synthetic."""
    style = "warn" if content.trained_on_synthetic(training_data) else "small"
    return style, "trained on: " + content.training_summary(training_data)


def _series_line(series: InputSeries) -> str:
    """One input series as the reader finds it in the viewer: role, series number and description, image count."""
    number = f"series {series.series_number}" if series.series_number is not None else "series"
    desc = f" '{series.series_description}'" if series.series_description else ""
    return f"{series.role}: {number}{desc}, {len(series.instances)} image(s)"


def summary_lines(result: VersionResult) -> list[tuple[str, str]]:
    """(style, text) lines of the summary's text column, in reading order; also what tests read.

    What a clinician needs first comes first: CANNOT GRADE and why; each
    model (by its plain name) with its answers, its held-out performance in
    one line and what it was trained on; the models the gate declined, shown
    as "not graded: <reason>" (never with a class or a probability); then
    which model paths ran and the input series.
    """
    lines: list[tuple[str, str]] = []
    if result.cannot_grade or not result.results:
        lines.append(("alert", "CANNOT GRADE"))
        lines.append(("body", "No model could grade this study." if result.declined else
                      content.plain_names(result.cannot_grade or "no model produced a result")))
    if result.gate_loosened:
        lines.append(("warn", result.gate_loosened))
    for m in result.results:
        lines.append(("head", family_title(m.family)))
        for t in m.tasks:
            title = _TASK_TITLE.get(t.task, t.task)
            lines.append(("result", f"{title}: {t.label}  (P = {t.probabilities.get(t.label, t.probability):.2f})"))
            lines.append(("small", content.threshold_line(t)))
        lines.append(("small", content.heldout_line(m.metrics, [t.task for t in m.tasks])))
        lines.append(_trained_on(m.training_data))
        lines.append(("small", f"checkpoint {m.checkpoint_name}  sha256 {m.checkpoint_sha256[:12]}"))
        for flag in m.quality_flags:
            lines.append(("warn", f"quality: {content.plain_names(flag)}"))
    for d in result.declined:
        lines.append(("head", f"{family_title(d.family)}: not graded"))
        for r in d.reasons:
            lines.append(("warn", f"not graded: {content.plain_names(r.reason)}"))
        if d.training_data:
            lines.append(_trained_on(d.training_data))
        lines.append(("small", f"checkpoint {d.checkpoint_name}  sha256 {d.checkpoint_sha256[:12]}"))
    lines.append(("head", "Model path"))
    declined = {d.family for d in result.declined}
    for d in result.decisions:
        state = "DECLINED by the gate" if d.family in declined else "RAN" if d.runs else "not run"
        lines.append(("small", f"{state}: {content.plain_names(content.short_reason(d.reason))}"))
    lines.append(("head", "Inputs"))
    lines += [("small", _series_line(s)) for s in result.inputs]
    lines.append(("small", "available: " + (", ".join(result.available_roles) or "none")))
    lines.append(("small", "missing: " + (", ".join(result.missing_roles) or "none")))
    for flag in result.quality_flags:
        lines.append(("warn", f"quality: {content.plain_names(flag)}"))
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

    def scaled(self, factor: float, floor: float) -> TextStyle:
        """This style ``factor`` times as large, never under ``floor`` points."""
        return dataclasses.replace(self, size=max(floor, round(self.size * factor, 2)))


# -- the page's geometry (pixels, origin top left) --------------------------------------------------------
#: kept empty on every side: viewers draw their own overlays (annotations, rulers) at the edges
MARGIN = 16
GUTTER = 20
#: every column is this wide: the slice and the text on the first image, two text columns on the others
COLUMN = (WIDTH - 2 * MARGIN - GUTTER) / 2
_COLUMN_X = ((float(MARGIN), MARGIN + COLUMN), (WIDTH - MARGIN - COLUMN, float(WIDTH - MARGIN)))
#: the smallest text the page draws: 8 pt at 100 dpi is 11 px, DejaVu Sans still legible at 1:1
MIN_POINTS = 8.0
#: the text column is set at the largest of these that fits, no style under its floor
_SCALES = (1.0, 0.93, 0.86, 0.8, 0.75, 0.7)
#: no summary has more images than this; what would not fit says where the rest is (the SR)
MAX_PAGES = 6
_LEAD = 1.3  # line pitch / font size: DejaVu's ascent + descent is 1.26 em, so rows never touch

#: style -> (how it is drawn at scale 1, its floor in points)
_FLOW: dict[str, tuple[TextStyle, float]] = {
    "alert": (TextStyle(20, "#ff5050", True), 16.0),
    "head": (TextStyle(12, "#9fd3ff", True), 10.0),
    "result": (TextStyle(14, "#ffffff", True), 11.0),
    "body": (TextStyle(11, "#ffffff"), 9.0),
    "small": (TextStyle(9, "#dddddd"), MIN_POINTS),
    "warn": (TextStyle(9, "#ffcc44"), MIN_POINTS),
}
_GAP_BEFORE = {"head": 0.6, "result": 0.15}  # extra space above, in em, unless the line opens a column
_INDENT = "    "  # continuation lines of a wrapped small line
_TITLE_TEXT = "Glioma grading \u2014 RESEARCH USE ONLY, NOT FOR DIAGNOSTIC USE"
_TITLE = TextStyle(16, "#ff5050", True)
_PAGE_NO = TextStyle(10, "#aaaaaa")
_BANNER = TextStyle(13, "#111111", True)
BANNER_FILL = "#ffb000"  # the synthetic-training warning: dark bold text on amber, the loudest thing on the page
_BANNER_PAD = 6.0
_CAPTION = TextStyle(MIN_POINTS, "#ffffff")
_NO_IMAGE = TextStyle(10, "#ffffff")
_STEP_TEXT = TextStyle(MIN_POINTS, "#cccccc")
_FOOTER, _FOOTER_LAST = TextStyle(9, "#ffcc44"), TextStyle(9, "#aaaaaa")
_MORE = TextStyle(10, "#9fd3ff", True)
_FRAME_OVERHANG = 4.0  # the slice's frame (4 pt line centred on the axes' edge) reaches this far outside its box

#: the steps the image shows first (what a reader checks: was the brain found, did it land on the template);
#: routine ones (reorient, the mask's voxel count, normalisation) after them
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
    anchor: str = "la"  # Pillow's anchors: "la" left/ascender, "ra" right/ascender, "ma" centre/ascender, "mm"

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the drawn text in pixels."""
        left, top, right, bottom = _font(self.style).getbbox(self.text, anchor=self.anchor)
        return self.x + left, self.y + top, self.x + right, self.y + bottom


@dataclass(frozen=True)
class Page:
    """One image of the summary before drawing: where the slice goes, every line of text, the filled boxes.

    ``frame`` is the slice's box in figure fractions (left, bottom, width,
    height), as matplotlib's ``add_axes`` takes it; None on a continuation
    image, which has no slice. ``fills`` are (left, top, right, bottom,
    colour) rectangles in pixels, drawn under the text (the warning banner).
    """

    panel: Panel | None
    frame: tuple[float, float, float, float] | None
    texts: list[PageText]
    fills: list[tuple[float, float, float, float, str]] = field(default_factory=list)
    number: int = 1
    count: int = 1

    def frame_box(self) -> tuple[float, float, float, float] | None:
        """The slice's box with its frame line, in pixels (left, top, right, bottom); None without a slice box."""
        if self.frame is None:
            return None
        left, bottom, width, height = self.frame
        o = _FRAME_OVERHANG
        return (left * WIDTH - o, (1 - bottom - height) * HEIGHT - o, (left + width) * WIDTH + o,
                (1 - bottom) * HEIGHT + o)


def _essential(steps: list[str]) -> list[str]:
    """The step lines in the order a reader needs them; routine steps last."""
    def rank(line: str) -> int:
        return next((i for i, p in enumerate(_STEP_PRIORITY) if line.startswith(p)), len(_STEP_PRIORITY))

    return sorted(steps, key=rank)


_BREAKS = re.compile(r"[ \t\r\n]+")  # where a line may break: not at a no-break space ("5.5\u00a0mm")
_UNIT = re.compile(r"(\d) (mm|ml|cm|px|%)(?=\W|$)")


def _keep_units(text: str) -> str:
    """A number and its unit joined by a no-break space, so "5.5 mm" never ends one line and starts the next."""
    return _UNIT.sub("\\1\u00a0\\2", text)


def _width(style: TextStyle, text: str) -> float:
    """How far ``text`` reaches to the right when drawn in ``style``, in pixels (an upper bound).

    The sum of the characters' advances, each measured once per font and
    thread: Pillow's BASIC layout applies no kerning, so the sum is the
    line's advance exactly; the last glyph's ink can reach a pixel past its
    advance ("V"), hence the 2 px. Measuring every candidate line with
    FreeType instead cost ~0.4 ms a call, seconds for a long summary.
    """
    if not text:
        return 0.0
    cache: dict[tuple[float, bool], dict[str, float]] | None = getattr(_fonts, "advances", None)
    if cache is None:
        cache = _fonts.advances = {}
    table = cache.setdefault((style.pixels, style.bold), {})
    total = 0.0
    for ch in text:
        w = table.get(ch)
        if w is None:
            w = table[ch] = float(_font(style).getlength(ch))
        total += w
    return total + 2.0


def _wrap(text: str, style: TextStyle, width: float, indent: str = "") -> list[str]:
    """``text`` broken into lines that, drawn in ``style``, are at most ``width`` pixels wide.

    Measured with the font that draws them (capitals, digits and long
    hashes are wider than an average character), greedy by words; a word
    wider than the column (a file name, a UID) is broken between characters
    rather than allowed to run off the page. Never drops text.
    """
    lines: list[str] = []
    current = ""
    for word in _BREAKS.split(text.strip()):
        candidate = f"{current} {word}" if current else (indent if lines else "") + word
        if _width(style, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        piece = (indent if lines else "") + word
        while _width(style, piece) > width:
            start = len(indent) if lines else 0
            lo, hi = start + 1, len(piece)  # the longest head of ``piece`` that fits (at least one character)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if _width(style, piece[:mid]) <= width:
                    lo = mid
                else:
                    hi = mid - 1
            lines.append(piece[:lo])
            piece = indent + piece[lo:]
        current = piece
    if current or not lines:
        lines.append(current)
    return lines


@dataclass(frozen=True)
class _Row:
    """One drawn line of the text flow."""

    text: str
    style: TextStyle
    gap: float  # space above it, unless it opens a column
    keep: bool  # glued to the next row: a heading never ends a column

    @property
    def pitch(self) -> float:
        return _LEAD * self.style.pixels


def _rows(lines: list[tuple[str, str]], scale: float) -> list[_Row]:
    out: list[_Row] = []
    for key, text in lines:
        base, floor = _FLOW[key]
        style = base.scaled(scale, floor)
        parts = _wrap(_keep_units(text), style, COLUMN, _INDENT if key in ("small", "warn") else "")
        for i, part in enumerate(parts):
            out.append(_Row(part, style, _GAP_BEFORE.get(key, 0.0) * style.pixels if i == 0 else 0.0, key == "head"))
    return out


def _columns_of(page: int) -> tuple[tuple[float, float], ...]:
    """The text columns' x ranges: the right one on the first image (the slice is left), both on the others."""
    return (_COLUMN_X[1],) if page == 1 else _COLUMN_X


_Placed = list[list[list[tuple[float, _Row]]]]  # pages -> columns -> (top y, row)


def _fill(rows: list[_Row], top: float, bottom: float, *, paginate: bool) -> _Placed:
    """The rows poured into the columns of as many images as they need, in reading order.

    ``paginate``: leave a line at the foot of each image's last column (for
    "continued on image k") and at the head of each later image ("continued
    from"); without it the caller only asks whether everything fits on one.
    """
    note = _LEAD * _MORE.pixels
    pages: _Placed = [[[]]]
    page, col = 1, 0
    y = top

    def limit() -> float:
        last = col == len(_columns_of(page)) - 1
        return bottom - (note if paginate and last else 0.0)

    i = 0
    while i < len(rows):
        column = pages[-1][col]
        need = (rows[i].gap if column else 0.0) + rows[i].pitch
        run, j = need, i
        while rows[j].keep and j + 1 < len(rows):  # a heading and the line under it go together
            j += 1
            run += rows[j].gap + rows[j].pitch
        if column and y + run > limit():
            if col + 1 < len(_columns_of(page)):
                col += 1
            else:
                page, col = page + 1, 0
                pages.append([])
            if col == len(pages[-1]):
                pages[-1].append([])
            y = top + (note if paginate and page > 1 and col == 0 else 0.0)
            continue
        column.append((y + (rows[i].gap if column else 0.0), rows[i]))
        y += need
        i += 1
    return pages


def _flow(lines: list[tuple[str, str]], top: float, bottom: float) -> tuple[_Placed, bool]:
    """The text column set as large as fits one image; else over the fewest images, as large as that allows.

    Returns the placed rows and whether they are paginated.
    """
    for scale in _SCALES:
        placed = _fill(_rows(lines, scale), top, bottom, paginate=False)
        if len(placed) == 1:
            return placed, False
    fewest = len(_fill(_rows(lines, _SCALES[-1]), top, bottom, paginate=True))
    for scale in _SCALES:
        placed = _fill(_rows(lines, scale), top, bottom, paginate=True)
        if len(placed) <= fewest:
            return placed, True
    return placed, True  # not reached: the last scale gives ``fewest``


def _page_header(warning: str | None, number: int, count: int
            ) -> tuple[list[PageText], list[tuple[float, float, float, float, str]], float]:
    """Title, "image k of n" and the synthetic-training banner; returns them and where the body starts."""
    texts = [PageText(MARGIN, MARGIN, _TITLE_TEXT, _TITLE)]
    if count > 1:
        texts.append(PageText(WIDTH - MARGIN, MARGIN + 4, f"image {number} of {count}", _PAGE_NO, "ra"))
    y = MARGIN + _LEAD * _TITLE.pixels + 4
    fills: list[tuple[float, float, float, float, str]] = []
    if warning:
        lines = _wrap(warning, _BANNER, WIDTH - 2 * MARGIN - 2 * _BANNER_PAD)
        pitch = _LEAD * _BANNER.pixels
        height = len(lines) * pitch + 2 * _BANNER_PAD
        fills.append((MARGIN, y, WIDTH - MARGIN - 1, y + height, BANNER_FILL))
        texts += [PageText(MARGIN + _BANNER_PAD, y + _BANNER_PAD + i * pitch + 2, line, _BANNER)
                  for i, line in enumerate(lines)]
        y += height
    return texts, fills, y + 12


def _footer(result: VersionResult, algorithm_version: str, number: int, count: int) -> tuple[list[PageText], float]:
    """The disclaimer and the version line at the foot of every image; returns them and where they start."""
    lines = [(part, _FOOTER) for part in _wrap(content.DISCLAIMER_TEXT, _FOOTER, WIDTH - 2 * MARGIN)]
    page = f"; image {number} of {count}" if count > 1 else ""
    last = (f"dicomnode {algorithm_version}; study version {result.version}{page}. "
            "The structured report (SR) in this study holds the full detail.")
    lines += [(part, _FOOTER_LAST) for part in _wrap(last, _FOOTER_LAST, WIDTH - 2 * MARGIN)]
    pitch = _LEAD * _FOOTER.pixels
    top = HEIGHT - MARGIN - len(lines) * pitch
    return [PageText(MARGIN, top + i * pitch, text, style) for i, (text, style) in enumerate(lines)], top - 10


def _drawn(panel: Panel) -> list[tuple[np.ndarray, str, str]]:
    """The outlines that can be drawn on the panel (same shape as the slice, not empty)."""
    return [(o, colour, label) for o, colour, label in panel.outlines
            if o.shape == panel.pixels.shape and o.any()]


def _fit(box: tuple[float, float, float, float], panel: Panel) -> tuple[float, float, float, float]:
    """The part of ``box`` (left, top, width, height in pixels) the slice fills at its aspect ratio.

    Centred across, at the top of the box: the caption above it and the
    steps under it stay next to the picture they describe.
    """
    left, top, width, height = box
    h, w = panel.pixels.shape
    want = h * panel.aspect / w  # drawn height / drawn width
    if height / width > want:
        return left, top, width, width * want
    fitted = height / want
    return left + (width - fitted) / 2, top, fitted, height


def _fractions(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """A (left, top, width, height) pixel box as matplotlib's (left, bottom, width, height) figure fractions."""
    left, top, width, height = box
    return left / WIDTH, 1 - (top + height) / HEIGHT, width / WIDTH, height / HEIGHT


def _slice_column(panel: Panel | None, top: float, bottom: float
                  ) -> tuple[tuple[float, float, float, float], list[PageText], list[str]]:
    """The first image's left column: caption, the slice's box, the outlines' legend, the preprocessing steps.

    Returns the slice's box (figure fractions), the text, and the step lines
    that did not fit under the slice (they continue in the text column, so
    no step is dropped).
    """
    x0 = _COLUMN_X[0][0]
    inner = COLUMN - 2 * _FRAME_OVERHANG  # the frame's line is drawn centred on the box's edge: keep it in the column
    if panel is None:
        box = (x0 + _FRAME_OVERHANG, top + _FRAME_OVERHANG, inner,
               min(COLUMN * 0.8, bottom - top) - 2 * _FRAME_OVERHANG)
        label = PageText(x0 + COLUMN / 2, box[1] + box[3] / 2, "no source image available", _NO_IMAGE, "mm")
        return _fractions(box), [label], []
    texts: list[PageText] = []
    y = top
    cap_pitch = _LEAD * _CAPTION.pixels
    for line in _wrap(panel.caption, _CAPTION, COLUMN):
        texts.append(PageText(x0 + COLUMN / 2, y, line, _CAPTION, "ma"))
        y += cap_pitch
    y += _FRAME_OVERHANG + 4
    step_pitch = _LEAD * _STEP_TEXT.pixels
    steps = _essential(panel.steps)
    legend = [(colour, label) for _, colour, label in _drawn(panel)]
    if steps or legend:
        # room for the legend, the heading and up to 12 step lines; the slice keeps at least 220 px
        wanted = (len(steps[:12]) + 1 + (1 if legend else 0)) * step_pitch + 2 * _FRAME_OVERHANG + 10
        height = max(220.0, min(COLUMN * 0.75, bottom - y - wanted))
    else:
        height = max(120.0, min(inner, bottom - y - _FRAME_OVERHANG))
    fitted = _fit((x0 + _FRAME_OVERHANG, y, inner, height), panel)
    y = fitted[1] + fitted[3] + _FRAME_OVERHANG + 8
    if legend:
        x = x0
        for colour, label in legend:
            item = PageText(x, y, f"\u2014 {label}", TextStyle(MIN_POINTS, colour))
            texts.append(item)
            x = item.box()[2] + 24
        y += step_pitch
    rest: list[str] = []
    if steps:
        lines = [("Preprocessing (what the model saw):", "")] + [(f"\u2022 {step}", "   ") for step in steps]
        for k, (line, indent) in enumerate(lines):
            parts = _wrap(line, _STEP_TEXT, COLUMN, indent)
            if y + len(parts) * step_pitch > bottom:
                rest = [step for step in steps[max(0, k - 1):]]
                break
            for part in parts:
                texts.append(PageText(x0, y, part, _STEP_TEXT))
                y += step_pitch
    return _fractions(fitted), texts, rest


def layout(result: VersionResult, panel: Panel | None, *, algorithm_version: str) -> list[Page]:
    """Every image of the summary: where the slice goes and every line of text, wrapped, measured and placed.

    Nothing is cut: the text column is set as large as fits (down to
    :data:`MIN_POINTS` for the smallest text); what still does not fit
    continues on further images of the same series, two text columns
    each, every image with the title, the synthetic-training warning and
    the disclaimer, and "image k of n" / "continued on image k".
    """
    warning = content.synthetic_warning(result)
    _, _, top = _page_header(warning, 1, 2)  # the header and footer heights do not depend on the page count
    _, bottom = _footer(result, algorithm_version, 1, 2)
    frame, left_texts, rest = _slice_column(panel, top, bottom)
    lines = summary_lines(result)
    if rest:
        lines += [("head", "Preprocessing (continued)")] + [("small", step) for step in rest]
    placed, paginated = _flow(lines, top, bottom)
    if len(placed) > MAX_PAGES:  # a pathological result: say where the rest is rather than make 50 images
        kept = placed[:MAX_PAGES]
        dropped = sum(len(c) for p in placed[MAX_PAGES:] for c in p)
        last_col = kept[-1][-1]
        y, row = last_col[-1]
        last_col[-1] = (y, dataclasses.replace(row, text=f"... {dropped + 1} more line(s): the SR holds the full text"))
        placed = kept
    count = len(placed)
    note_pitch = _LEAD * _MORE.pixels
    pages: list[Page] = []
    for number, columns in enumerate(placed, start=1):
        texts, fills, _ = _page_header(warning, number, count)
        footer, _ = _footer(result, algorithm_version, number, count)
        texts += footer
        xs = _columns_of(number)
        for (x0, _x1), rows in zip(xs, columns):
            texts += [PageText(x0, y, row.text, row.style) for y, row in rows]
        if paginated and number > 1:
            texts.append(PageText(xs[0][0], top, f"(continued from image {number - 1} of {count})", _MORE))
        if paginated and number < count:
            texts.append(PageText(xs[-1][0], bottom - note_pitch,
                                  f"continued on image {number + 1} of {count} in this series", _MORE))
        if number == 1:
            pages.append(Page(panel, frame, left_texts + texts, fills, number, count))
        else:
            pages.append(Page(None, None, texts, fills, number, count))
    return pages


def _slice_pixels(page: Page) -> np.ndarray:
    """The page without its text, as (HEIGHT, WIDTH, 3) uint8: black, with the slice in its box.

    matplotlib draws the slice (nearest-neighbour pixels, the masks' contours,
    the frame) on an Agg canvas; it does not draw text, which it renders
    glyph by glyph in Python (two thirds of the summary's time for ~40 lines).
    A continuation image has no slice: black, without matplotlib.
    """
    if page.frame is None:
        return np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
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


def render_page(page: Page) -> np.ndarray:
    """One image as an (HEIGHT, WIDTH, 3) uint8 RGB array: the slice by matplotlib, fills and text by Pillow."""
    image = Image.fromarray(np.ascontiguousarray(_slice_pixels(page)), mode="RGB")
    draw = ImageDraw.Draw(image)
    for left, top, right, bottom, colour in page.fills:
        draw.rectangle((left, top, right, bottom), fill=colour)
    for t in page.texts:
        draw.text((t.x, t.y), t.text, font=_font(t.style), fill=t.style.colour, anchor=t.anchor)
    return np.ascontiguousarray(np.asarray(image), dtype=np.uint8)


def render(result: VersionResult, panel: Panel | None, *, algorithm_version: str) -> list[np.ndarray]:
    """The summary's images, each an (HEIGHT, WIDTH, 3) uint8 RGB array (usually one)."""
    return [render_page(page) for page in layout(result, panel, algorithm_version=algorithm_version)]


def build_summary(result: VersionResult, *, algorithm_version: str, manufacturer: str = "dicomnode",
                  when: _dt.datetime | None = None, uid_prefix: str | None = None) -> list[Dataset]:
    """The summary as Secondary Capture images (RGB) in the source study, one deterministic series, in order."""
    pages = summary_from_example(result, read_example(result), choose_panel(result),
                                 algorithm_version=algorithm_version, manufacturer=manufacturer, when=when,
                                 uid_prefix=uid_prefix)
    log.info("built summary image(s) for study %s version %s: %d", result.study_id, result.version, len(pages))
    return pages


def summary_from_example(result: VersionResult, example: Dataset, panel: Panel | None, *, algorithm_version: str,
                         manufacturer: str = "dicomnode", when: _dt.datetime | None = None,
                         uid_prefix: str | None = None) -> list[Dataset]:
    """:func:`build_summary` with the source header read and the slice chosen by the caller.

    ``write_reports`` reads the header once for both objects; ``warm`` passes
    a tiny synthetic header and panel, so warming reads no file.

    Why further images rather than a taller one: a PACS viewer fits an image
    to its viewport, so a page twice as tall is shown at half the size and
    its text becomes unreadable without zooming; images of one series are
    shown at full size and paged with the scroll wheel, as a radiologist
    pages any series, and the viewer's own "2/2" says there is more.
    """
    when = when or _dt.datetime.now()
    uids = report_uids(result, prefix=uid_prefix)
    out: list[Dataset] = []
    images = render(result, panel, algorithm_version=algorithm_version)
    for number, pixels in enumerate(images, start=1):
        sc = SCImage.from_ref_dataset(
            ref_dataset=example,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=uids["sc_series"],
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=summary_page_uid(result, number, prefix=uid_prefix),
            instance_number=number,
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
        sc.ImageComments = "Research use only. Not for diagnostic use." + (
            f" Summary image {number} of {len(images)}." if len(images) > 1 else "")
        stamp_time(sc, when, date_attrs=[("InstanceCreationDate", "InstanceCreationTime"),
                                         ("DateOfSecondaryCapture", "TimeOfSecondaryCapture")])
        out.append(sc)
    log.debug("built %d summary image(s) for study %s version %s", len(out), result.study_id, result.version)
    return out
