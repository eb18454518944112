"""The report stage: a TID 1500 SR (and a Secondary Capture summary) for one graded study version.

Public API::

    build_sr(result, *, algorithm_version, manufacturer="dicomnode", when=None, uid_prefix=None)
        -> highdicom.sr.Comprehensive3DSR
    build_summary(result, *, algorithm_version, manufacturer="dicomnode", when=None, uid_prefix=None)
        -> highdicom.sc.SCImage (a pydicom Dataset)
    report_uids(result, *, prefix=None) -> {"sr_series", "sr_sop", "sc_series", "sc_sop"}
    write_reports(result, out_dir, *, algorithm_version, summary_image=True, manufacturer="dicomnode",
                  when=None, uid_prefix=None) -> [out_dir/"sr.dcm", out_dir/"summary.dcm"]
    describe(sr_path) -> str; render_html(sr_path, out_html) -> Path; summary_png(summary_dcm, out_png) -> Path

Rooms as in highdicom: ``sop`` builds the objects, ``content`` the per-model
content items, ``codes`` the coded concepts (with where each was verified),
``summary`` the Secondary Capture, ``render`` the human views.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.files import write_atomic
from dicomnode.handoff import VersionResult
from dicomnode.index.studies import VersionInfo
from dicomnode.stages.context import StageContext, package_version

from dicomnode.stages.report.render import describe, render_html, summary_png
from dicomnode.stages.report.sop import build_sr, report_uids
from dicomnode.stages.report.summary import build_summary

log = logging.getLogger(__name__)

SR_FILE = "sr.dcm"
SUMMARY_FILE = "summary.dcm"


def _write_atomic(ds: Dataset, path: Path) -> None:
    """A reader (dispatch) never sees half a report, even after a crash."""
    write_atomic(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))


def write_reports(result: VersionResult, out_dir: Path, *, algorithm_version: str, summary_image: bool = True,
                  manufacturer: str = "dicomnode", when: _dt.datetime | None = None,
                  uid_prefix: str | None = None) -> list[Path]:
    """Write ``sr.dcm`` (and ``summary.dcm``) into ``out_dir``; same input and ``when`` -> same bytes.

    Both objects are built before either is written, so a failure leaves the
    previous files (if any) untouched rather than a new SR beside an old
    summary. A stale ``summary.dcm`` is removed when ``summary_image`` is off,
    so the directory always holds exactly what this call returned.
    """
    when = when or _dt.datetime.now()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(algorithm_version=algorithm_version, manufacturer=manufacturer, when=when, uid_prefix=uid_prefix)
    objects: list[tuple[Dataset, Path]] = [(build_sr(result, **kw), out_dir / SR_FILE)]
    if summary_image:
        objects.append((build_summary(result, **kw), out_dir / SUMMARY_FILE))
    for ds, path in objects:
        _write_atomic(ds, path)
    if not summary_image:
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
    log.info("wrote %d report object(s) for study %s version %s", len(objects), result.study_id, result.version)
    return [path for _, path in objects]


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """The report stage: the SR (and summary image) of the version's result; it supersedes the previous version's."""
    wd = ctx.work_dir(info)
    result = VersionResult.load(wd / "result.json")
    result = dataclasses.replace(
        result,
        timings={stage: v.get("seconds") or 0.0 for stage, v in ctx.jobs.of_version(info.version_id).items()
                 if stage in ("convert", "preprocess", "infer")},
        supersedes=ctx.reports.previous(info.study_id, info.version))
    if result.cannot_grade and not ctx.settings.report_cannot_grade:
        ctx.reports.record(info, [], result, sent_report=False)
        return {"report": None, "why": "cannot grade and report_cannot_grade is off",
                "cannot_grade": result.cannot_grade}
    out_dir = ctx.settings.data_path / "reports" / f"study-{info.study_id}" / f"v{info.version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_reports(result, out_dir, summary_image=ctx.settings.summary_image,
                          algorithm_version=package_version())
    ctx.reports.record(info, files, result, sent_report=True)
    return {"files": [str(p.relative_to(ctx.settings.data_path)) for p in files],
            "cannot_grade": result.cannot_grade}


__all__ = ["build_sr", "build_summary", "report_uids", "write_reports", "describe", "render_html",
           "summary_png", "SR_FILE", "SUMMARY_FILE"]
