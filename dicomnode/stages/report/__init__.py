"""The report stage: a TID 1500 SR (and a Secondary Capture summary) for one graded study version.

Public API::

    build_sr(result, *, algorithm_version, manufacturer="dicomnode", when=None, uid_prefix=None)
        -> highdicom.sr.Comprehensive3DSR
    build_summary(result, *, algorithm_version, manufacturer="dicomnode", when=None, uid_prefix=None)
        -> [highdicom.sc.SCImage (a pydicom Dataset)], one per image of the summary (usually one)
    report_uids(result, *, prefix=None) -> {"sr_series", "sr_sop", "sc_series", "sc_sop"}
    write_reports(result, out_dir, *, algorithm_version, summary_image=True, manufacturer="dicomnode",
                  when=None, uid_prefix=None) -> [out_dir/"sr.dcm", out_dir/"summary.dcm", (summary-2.dcm ...)]
    timed_write_reports(...same...) -> (paths, {"sr", "summary", "write"} seconds)
    describe(sr_path) -> str; render_html(sr_path, out_html) -> Path; summary_png(summary_dcm, out_png) -> Path
    warm(ctx) -> None (the runtime calls it once per worker, in a background thread)

Rooms as in highdicom: ``sop`` builds the objects, ``content`` the per-model
content items, ``codes`` the coded concepts (with where each was verified),
``summary`` the Secondary Capture, ``render`` the human views.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicomnode.files import fsync_dir, temporary_name
from dicomnode.handoff import (
    Decision,
    Declined,
    GateReason,
    InputSeries,
    KeySlice,
    ModelResult,
    SourceRef,
    TaskResult,
    VersionResult,
)
from dicomnode.index.studies import VersionInfo
from dicomnode.stages.context import StageContext, package_version

from dicomnode.stages.report.render import describe, render_html, summary_png
from dicomnode.stages.report.sop import build_sr, outcome, read_example, report_uids, sr_from_example
from dicomnode.stages.report.summary import MASK_COLOUR, Panel, build_summary, choose_panel, summary_from_example

log = logging.getLogger(__name__)

SR_FILE = "sr.dcm"
SUMMARY_FILE = "summary.dcm"


def summary_file(number: int) -> str:
    """File name of image ``number`` (1-based) of the summary: ``summary.dcm``, then ``summary-2.dcm`` ..."""
    return SUMMARY_FILE if number == 1 else f"summary-{number}.dcm"


def _summary_files(out_dir: Path) -> list[Path]:
    """Every summary image file in ``out_dir`` (stale continuation images included)."""
    return sorted(p for p in out_dir.glob("summary*.dcm")
                  if p.name == SUMMARY_FILE or (p.name[8:-4].isdigit() and p.name.startswith("summary-")))


def _encode(ds: Dataset) -> bytes:
    """The object as a DICOM file (preamble, meta header), in memory: the thread that writes it touches no Dataset."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class _Staged:
    """One object written to a temporary file beside its final name and fsynced, on a thread of its own.

    Why a thread: fsync waits for the disk, not the CPU, and releases the
    GIL, so the SR reaches the disk while the summary is being drawn. Why a
    temporary file: nothing under the final name changes until every object
    is built and on disk (:func:`timed_write_reports` renames them then), so a
    reader (dispatch) never sees half a report, and a failure to build the
    summary leaves the previous SR, not a new SR beside an old summary.
    """

    def __init__(self, data: bytes, path: Path) -> None:
        self.path = path
        self.tmp = temporary_name(path)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, args=(data,), name=f"report-write-{path.name}",
                                       daemon=True)
        self.thread.start()

    def _write(self, data: bytes) -> None:
        try:
            with open(self.tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException as exc:  # handed to the caller's thread by wait()
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error

    def discard(self) -> None:
        """Remove the temporary file if it was not renamed (a failure after staging)."""
        self.thread.join()
        self.tmp.unlink(missing_ok=True)


def timed_write_reports(result: VersionResult, out_dir: Path, *, algorithm_version: str, summary_image: bool = True,
                        manufacturer: str = "dicomnode", when: _dt.datetime | None = None,
                        uid_prefix: str | None = None) -> tuple[list[Path], dict[str, float]]:
    """:func:`write_reports`, also returning where the time went: ``sr``, ``summary`` and ``write`` seconds.

    ``write`` is encoding both objects plus whatever of the disk writes was
    not already done while the summary was being drawn (the SR's is started
    before the summary is built); ``benchmarks/report.py`` prints the split.
    """
    when = when or _dt.datetime.now()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(algorithm_version=algorithm_version, manufacturer=manufacturer, when=when, uid_prefix=uid_prefix)
    seconds = {"sr": 0.0, "summary": 0.0, "write": 0.0}
    mark = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        seconds[what] += now - mark
        mark = now

    staged: list[_Staged] = []
    try:
        example = read_example(result)  # once, for both objects
        sr = sr_from_example(result, example, **kw)
        lap("sr")
        staged.append(_Staged(_encode(sr), out_dir / SR_FILE))  # on disk while the summary is drawn
        lap("write")
        if summary_image:
            pages = summary_from_example(result, example, choose_panel(result), **kw)
            lap("summary")
            staged += [_Staged(_encode(sc), out_dir / summary_file(k)) for k, sc in enumerate(pages, start=1)]
        for s in staged:
            s.wait()
        for s in staged:
            os.replace(s.tmp, s.path)
        fsync_dir(out_dir)  # once for both renames
    finally:
        for s in staged:
            s.discard()
    written = {s.path for s in staged}
    for stale in _summary_files(out_dir):  # no summary asked for, or fewer images than last time
        if stale not in written:
            stale.unlink(missing_ok=True)
    lap("write")
    log.info("wrote %d report object(s) (%s) for study %s version %s in %.2f s (SR %.2f s, summary %.2f s, "
             "writes %.2f s)", len(staged), outcome(result), result.study_id, result.version, sum(seconds.values()),
             seconds["sr"], seconds["summary"], seconds["write"])
    return [s.path for s in staged], seconds


def write_reports(result: VersionResult, out_dir: Path, *, algorithm_version: str, summary_image: bool = True,
                  manufacturer: str = "dicomnode", when: _dt.datetime | None = None,
                  uid_prefix: str | None = None) -> list[Path]:
    """Write ``sr.dcm`` and the summary image(s) into ``out_dir``; same input and ``when``, same bytes.

    The summary is ``summary.dcm``, followed by ``summary-2.dcm``... when its
    text needs more than one image (:func:`summary_file`). Every object is built (and on disk under temporary names) before any
    final name changes, so a failure leaves the previous files (if any)
    untouched rather than a new SR beside an old summary; each lands by an
    atomic rename after its fsync, then the directory is fsynced. Stale
    summary images (``summary_image`` off, or fewer images than a previous
    run) are removed, so the directory always holds exactly what this call
    returned.
    """
    return timed_write_reports(result, out_dir, algorithm_version=algorithm_version, summary_image=summary_image,
                               manufacturer=manufacturer, when=when, uid_prefix=uid_prefix)[0]


# --------------------------------------------------------------------------- warming a worker


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["dicomnode.stages.report.warm", *parts]))


def _warm_inputs() -> tuple[VersionResult, Dataset, Panel]:
    """A tiny graded version (a key slice, measurements, a declined model), its source header and a slice.

    Everything in memory: warming reads no study and writes no file. It walks
    the same code as a real study (every kind of content item, evidence, the
    SC, a contour), so the tables and caches a real study needs are filled.
    """
    study, series = _uid("study"), _uid("series")
    mr = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    refs = [SourceRef(series, mr, _uid("instance", str(i))) for i in range(4)]
    example = Dataset()
    example.SpecificCharacterSet = "ISO_IR 100"
    example.SOPClassUID, example.SOPInstanceUID = mr, refs[0].sop_instance_uid
    example.StudyInstanceUID, example.SeriesInstanceUID = study, series
    example.PatientName, example.PatientID, example.PatientBirthDate, example.PatientSex = "WARM^UP", "WARM", "", "O"
    example.StudyDate, example.StudyTime, example.StudyID, example.AccessionNumber = "20000101", "000000", "1", ""
    example.ReferringPhysicianName, example.Modality, example.BodyPartExamined = "", "MR", "BRAIN"
    task = TaskResult("grade", "HGG", 0.8, {"LGG": 0.2, "HGG": 0.8}, True)
    model = ModelResult(family="mmdlm", paper="warm", checkpoint_name="warm.ckpt", checkpoint_sha256="0" * 64,
                        checkpoint_created="2000-01-01T00:00:00Z", input_roles=["T2"], reason="warming up",
                        tasks=[task], key_slices=[KeySlice("T2", 0.5, refs[2], grid_index=2)],
                        measurements={"brain_volume_ml": 1400.0}, feature_distance=1.0, feature_threshold=2.0,
                        training_data={"description": "synthetic warm-up"},
                        metrics={"test": {"grade": {"auc": 0.5, "n": 2}}})
    declined = Declined(family="fs3dcnn", paper="warm", checkpoint_name="warm2.ckpt", checkpoint_sha256="1" * 64,
                        input_roles=["T2"], reasons=[GateReason("slices/T2", 4.0, "1", 10.0, None, "too few slices")])
    result = VersionResult(
        study_instance_uid=study, study_id=0, version=0,
        inputs=[InputSeries("T2", series, 1, "warm", refs, "(in memory)")],
        available_roles=["T2"], missing_roles=["T1", "T1CE", "FLAIR"],
        decisions=[Decision("mmdlm", True, "warming up"), Decision("fs3dcnn", True, "warming up")],
        results=[model], declined=[declined], quality_flags=["warming up"])
    grid = np.add.outer(np.arange(16.0), np.arange(16.0))
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    panel = Panel(grid.astype(np.float32), "warming up", True, 1.0, [(mask, MASK_COLOUR, "brain mask")],
                  ["brain extraction (warm)"])
    return result, example, panel


def warm(ctx: StageContext | None) -> None:
    """Pay this process's one-time report costs before its first study, off the listener's path.

    The runtime calls it once per worker in a background thread (importing
    this module, which is half of it: highdicom, matplotlib, Pillow). Then one
    tiny SR and one tiny summary are built and encoded in memory and thrown
    away: highdicom loads the standard's module tables on its first object
    (about half a second), pydicom its writers and character sets, matplotlib
    its Agg and contour paths, Pillow FreeType. ``ctx`` is not needed.

    Last, the garbage collector: the imports leave ~400,000 tracked objects
    (modules, highdicom's tables), and the first full collection, which came
    during the first study, walked them all (0.3 s on a loaded 2-core host,
    half the study's own time). ``gc.freeze()`` after one collection moves
    what is alive now out of the collector's view for the life of the worker
    (objects freed by reference counting are still freed); later full
    collections walk only what studies allocate.
    """
    t0 = time.perf_counter()
    result, example, panel = _warm_inputs()
    when = _dt.datetime(2000, 1, 1)
    sr = sr_from_example(result, example, algorithm_version="warm", when=when)
    pages = summary_from_example(result, example, panel, algorithm_version="warm", when=when)
    for ds in (sr, *pages):
        _encode(ds)
    del result, example, panel, sr, pages
    gc.collect()
    gc.freeze()
    log.debug("report stage warmed in %.2f s", time.perf_counter() - t0)


def _purged_flag(n: int) -> list[str]:
    """Why a late version may read worse than the one it supersedes: retention removed the earlier arrivals.

    A series that arrives after an earlier version was delivered and purged (docs/retention.md) opens a
    version graded on what arrived since; its SR supersedes the earlier one, so it must say so.
    """
    if n <= 0:
        return []
    return [f"{n} earlier instance(s) of this study were removed by retention after an earlier report was "
            f"delivered; this version was read from the instances received since"]


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """The report stage: the SR (and summary image) of the version's result; it supersedes the previous version's."""
    wd = ctx.work_dir(info)
    result = VersionResult.load(wd / "result.json")
    result = dataclasses.replace(
        result,
        timings={stage: v.get("seconds") or 0.0 for stage, v in ctx.jobs.of_version(info.version_id).items()
                 if stage in ("convert", "preprocess", "infer")},
        supersedes=ctx.reports.previous(info.study_id, info.version),
        quality_flags=[*result.quality_flags, *_purged_flag(ctx.index.purged_instances(info.study_id, info.version))])
    if result.cannot_grade and not ctx.settings.report_cannot_grade:
        ctx.reports.record(info, [], result)
        return {"report": None, "why": "cannot grade and report_cannot_grade is off",
                "cannot_grade": result.cannot_grade}
    out_dir = ctx.settings.data_path / "reports" / f"study-{info.study_id}" / f"v{info.version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_reports(result, out_dir, summary_image=ctx.settings.summary_image,
                          algorithm_version=package_version())
    ctx.reports.record(info, files, result)
    return {"files": [str(p.relative_to(ctx.settings.data_path)) for p in files],
            "cannot_grade": result.cannot_grade}


__all__ = ["build_sr", "build_summary", "report_uids", "write_reports", "timed_write_reports", "describe",
           "render_html", "summary_png", "summary_file", "warm", "run", "SR_FILE", "SUMMARY_FILE"]
