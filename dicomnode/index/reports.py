"""Which report each study version produced: for supersession, status and the outbox.

Kept in the index (not only as files) because a new version's report must name
the one it replaces even when the earlier report was made on another host.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from sqlalchemy import delete, insert, select

from dicomnode.index.schema import ReportRow
from dicomnode.index.studies import Index, VersionInfo
from dicomnode.handoff import Superseded, TaskResult, VersionResult

SR_MODALITY = "SR"


def _positive(task: TaskResult) -> str:
    """The class whose probability ``task.probability`` is (the positive one, models.base.TASKS[task][1]).

    Found by value because the JSON hand-over between steps sorts keys.
    """
    return min(task.probabilities, key=lambda name: abs(task.probabilities[name] - task.probability))


def summarise(result: VersionResult) -> dict[str, Any]:
    """What ``dicomnode status`` shows per version: findings per model, or why there are none (no PHI)."""
    return {
        "cannot_grade": result.cannot_grade,
        "available_roles": result.available_roles,
        "missing_roles": result.missing_roles,
        "models": [
            {"family": m.family, "checkpoint": m.checkpoint_sha256[:12], "device": m.device,
             "seconds": round(m.seconds, 3),
             "findings": {t.task: {"label": t.label, "probability": round(t.probability, 4),
                                   "positive_class": _positive(t)} for t in m.tasks}}
            for m in result.results
        ],
        "quality_flags": result.quality_flags,
        # models the gate did not let grade: the reasons only, never a label or probability
        "declined": [{"family": d.family, "checkpoint": d.checkpoint_sha256[:12], "stage": d.stage,
                      "reasons": [r.reason for r in d.reasons]} for d in result.declined],
        "gate_loosened": result.gate_loosened,
    }


class Reports:
    def __init__(self, index: Index, data_path: Path) -> None:
        self.index = index
        self.data_path = data_path

    def record(self, info: VersionInfo, files: list[Path], result: VersionResult) -> None:
        """Store the version's report: its files (none when nothing was written) and its summary.

        The summary says ``report_written`` (files were made), never whether
        they reached a PACS: that is the outbox's to know, and the status
        document computes it from the deliveries (runtime.monitor).
        """
        sr_uid = sr_series = None
        rel: list[str] = []
        uids: list[str] = []
        for f in files:
            ds = dcmread(f, stop_before_pixels=True)
            uids.append(str(ds.SOPInstanceUID))
            if ds.Modality == SR_MODALITY:
                sr_uid, sr_series = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            rel.append(str(Path(f).resolve().relative_to(self.data_path)))
        self.index.add_own_objects(uids, info.version_id)
        with self.index.engine.begin() as c:
            c.execute(delete(ReportRow).where(ReportRow.version_id == info.version_id))
            c.execute(insert(ReportRow).values(
                version_id=info.version_id, study_id=info.study_id, version=info.version,
                sr_sop_instance_uid=sr_uid, sr_series_instance_uid=sr_series, files=rel,
                summary={**summarise(result), "report_written": bool(files)}, created_at=time.time()))

    def files(self, version_id: int) -> list[str]:
        with self.index.engine.connect() as c:
            row = c.execute(select(ReportRow.files).where(ReportRow.version_id == version_id)).first()
        return list(row[0]) if row else []

    def previous(self, study_id: int, version: int) -> Superseded | None:
        """The newest earlier version's SR of this study, which a new version's report supersedes."""
        with self.index.engine.connect() as c:
            row = c.execute(
                select(ReportRow.version, ReportRow.sr_sop_instance_uid, ReportRow.sr_series_instance_uid)
                .where(ReportRow.study_id == study_id, ReportRow.version < version,
                       ReportRow.sr_sop_instance_uid.is_not(None))
                .order_by(ReportRow.version.desc())
            ).first()
        return Superseded(row[0], row[1], row[2]) if row else None

    def by_version(self) -> dict[int, dict[str, Any]]:
        """Each version's report as stored; rows written before ``report_written`` existed get it from their files.

        Those older rows carry ``report_sent``, which meant "written"; it is
        passed through as stored (the status document overwrites it with what
        the outbox knows).
        """
        with self.index.engine.connect() as c:
            rows = c.execute(select(ReportRow.version_id, ReportRow.sr_sop_instance_uid, ReportRow.files,
                                    ReportRow.summary)).all()
        return {v: {"sr_sop_instance_uid": uid, "files": files, "report_written": bool(files), **summary}
                for v, uid, files, summary in rows}
