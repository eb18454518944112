"""Make ``index-v1.sql``: an index database as release 1 (before Alembic) left it, with a few rows.

Why it exists: the first schema change after a site installs the node must
not break that site. The migration tests load this dump and check that the
node recognises it, stamps it as revision 0001 and upgrades it without
losing a row. So the schema here must be what release 1 *actually* created:
``Base.metadata.create_all`` over a frozen, verbatim copy of release 1's
table definitions (``dicomnode/index/schema.py`` as it was before
``dicomnode/index/migrations`` existed). Never import the live schema here:
it moves on with every revision, this must not.

The rows are synthetic (``2.25.`` UIDs, no PHI) but shaped like what the
node writes: a study whose version 1 completed and ran every pipeline step,
a report, a sent delivery, the events, and ``meta.schema_version = '1'``.

Run ``python tests/data/make_index_v1.py`` to rewrite the dump (only needed
if the rows should change; the schema is frozen). The tests also import
``OldBase`` and ``ROWS`` from here to build the same database on PostgreSQL.
"""
from __future__ import annotations

import hashlib
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import (JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        insert)
from sqlalchemy import Index as SqlIndex
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

HERE = Path(__file__).resolve().parent
DUMP = HERE / "index-v1.sql"


# -- release 1's schema, verbatim (do not edit) ---------------------------------------------------


class OldBase(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Study(OldBase):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class StudyVersion(OldBase):
    __tablename__ = "study_versions"
    __table_args__ = (UniqueConstraint("study_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32), index=True)
    opened_at: Mapped[float] = mapped_column(Float)
    last_instance_at: Mapped[float] = mapped_column(Float)
    released_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    complete_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    new_instances: Mapped[int] = mapped_column(Integer, default=0)


class Series(OldBase):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Instance(OldBase):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    gradable: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str] = mapped_column(String(255), unique=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    calling_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    peer_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)


class VersionSeries(OldBase):
    __tablename__ = "version_series"
    __table_args__ = (UniqueConstraint("version_id", "series_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    role: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[list[Any]] = mapped_column(JSON)
    chosen_over: Mapped[list[Any]] = mapped_column(JSON)


class EventRow(OldBase):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class OwnObject(OldBase):
    __tablename__ = "own_objects"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    returned: Mapped[int] = mapped_column(Integer, default=0)


class Meta(OldBase):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Job(OldBase):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("version_id", "stage"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), index=True)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    stage: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), index=True)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    holder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ReportRow(OldBase):
    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), unique=True)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    version: Mapped[int] = mapped_column(Integer)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sr_series_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    files: Mapped[list[Any]] = mapped_column(JSON)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class Delivery(OldBase):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_deliveries_destination_sop"),
        SqlIndex("ix_deliveries_due", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


# -- the rows -------------------------------------------------------------------------------------

T0 = 1_714_000_000.0  # 2024-04-24, an arbitrary fixed epoch so the dump is reproducible
STUDY = "2.25.100000000000000000000000000000000001"
SERIES_T1 = "2.25.100000000000000000000000000000000011"
SERIES_FLAIR = "2.25.100000000000000000000000000000000012"
SR_SERIES = "2.25.100000000000000000000000000000000021"
SR_SOP = "2.25.100000000000000000000000000000000022"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEST = "PACS@10.0.0.5:104"
INSTANCE_1 = "2.25.100000000000000000000000000000000101"


def uid_tag(uid: str) -> str:
    """As dicomnode.logs.uid_tag (copied: this file must not import the node)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:10]


STAGES = ("convert", "preprocess", "infer", "report", "dispatch")


def _instances() -> list[dict[str, Any]]:
    out = []
    for i, (series_id, series_uid) in enumerate([(1, SERIES_T1)] * 2 + [(2, SERIES_FLAIR)] * 2, start=1):
        out.append({"id": i, "sop_instance_uid": f"2.25.10000000000000000000000000000000010{i}", "sop_class_uid": MR,
                    "transfer_syntax_uid": EXPLICIT_LE, "study_id": 1, "series_id": series_id, "version": 1,
                    "gradable": True, "path": f"spool/store/{STUDY}/{series_uid}/{i:04d}.dcm",
                    "size_bytes": 131_072 + i, "received_at": T0 + i, "calling_ae": "MODALITY1",
                    "peer_address": "10.0.0.7", "duplicates": 1 if i == 1 else 0})
    return out


SUMMARY = {
    "cannot_grade": False, "available_roles": ["FLAIR", "T1"], "missing_roles": ["T1C", "T2"],
    "models": [{"family": "promptnet", "checkpoint": "0123456789ab", "device": "cpu", "seconds": 12.345,
                "findings": {"idh": {"label": "IDH-wildtype", "probability": 0.8123,
                                     "positive_class": "IDH-wildtype"}}}],
    "quality_flags": [], "declined": [], "gate_loosened": False, "report_sent": True,
}

ROWS: dict[str, list[dict[str, Any]]] = {
    "meta": [{"key": "schema_version", "value": "1"}],
    "studies": [{"id": 1, "study_instance_uid": STUDY, "created_at": T0 + 1}],
    "study_versions": [{"id": 1, "study_id": 1, "version": 1, "state": "complete", "opened_at": T0 + 1,
                        "last_instance_at": T0 + 4, "released_at": T0 + 5, "completed_at": T0 + 35,
                        "complete_reason": "quiet_period", "new_instances": 4}],
    "series": [
        {"id": 1, "study_id": 1, "series_instance_uid": SERIES_T1, "modality": "MR", "series_number": 3,
         "series_description": "t1_mprage_sag", "created_at": T0 + 1},
        {"id": 2, "study_id": 1, "series_instance_uid": SERIES_FLAIR, "modality": "MR", "series_number": 5,
         "series_description": "t2_flair_tra", "created_at": T0 + 3},
    ],
    "instances": _instances(),
    "version_series": [
        {"id": 1, "version_id": 1, "series_id": 1, "role": "T1", "status": "selected",
         "reason": "3D T1-weighted gradient echo", "evidence": ["ScanningSequence=GR", "MRAcquisitionType=3D"],
         "chosen_over": []},
        {"id": 2, "version_id": 1, "series_id": 2, "role": "FLAIR", "status": "selected",
         "reason": "inversion recovery with long TI", "evidence": ["ScanningSequence=IR", "InversionTime=2500"],
         "chosen_over": []},
    ],
    "events": [
        {"id": 1, "at": T0 + 1, "kind": "version_opened", "study_id": 1, "version_id": None,
         "message": "study 1 version 1 receiving", "detail": {}},
        {"id": 2, "at": T0 + 2, "kind": "duplicate_instance", "study_id": 1, "version_id": None,
         "message": f"duplicate SOP instance {uid_tag(INSTANCE_1)} from MODALITY1@10.0.0.7; first copy kept",
         "detail": {"sop_instance_uid": INSTANCE_1}},
        {"id": 3, "at": T0 + 35, "kind": "version_complete", "study_id": 1, "version_id": 1,
         "message": "study 1 version 1 complete (quiet_period); roles: FLAIR, T1",
         "detail": {"reason": "quiet_period", "roles": ["FLAIR", "T1"]}},
        {"id": 4, "at": T0 + 80, "kind": "delivery_queued", "study_id": 1, "version_id": 1,
         "message": "study 1: 1 delivery(ies) queued for 1 destination(s)", "detail": {"deliveries": 1}},
    ],
    "own_objects": [{"sop_instance_uid": SR_SOP, "version_id": 1, "created_at": T0 + 79, "returned": 0}],
    "jobs": [
        {"id": n, "version_id": 1, "study_id": 1, "stage": stage, "state": "done", "deliveries": 1, "error": None,
         "created_at": T0 + 35 + 10 * n, "started_at": T0 + 36 + 10 * n, "finished_at": T0 + 44 + 10 * n,
         "seconds": 8.0, "sent_at": T0 + 35 + 10 * n, "holder": None, "lease_until": None,
         "detail": {"stage": stage}}
        for n, stage in enumerate(STAGES, start=1)
    ],
    "reports": [{"id": 1, "version_id": 1, "study_id": 1, "version": 1, "sr_sop_instance_uid": SR_SOP,
                 "sr_series_instance_uid": SR_SERIES, "files": [f"reports/{STUDY}/v1/sr.dcm"], "summary": SUMMARY,
                 "created_at": T0 + 79}],
    "deliveries": [{"id": 1, "study_id": 1, "version_id": 1, "destination": DEST, "sop_instance_uid": SR_SOP,
                    "sop_class_uid": ENHANCED_SR, "transfer_syntax_uid": EXPLICIT_LE,
                    "path": f"reports/{STUDY}/v1/sr.dcm", "state": "sent", "attempts": 1, "next_attempt_at": T0 + 80,
                    "claimed_until": None, "claim_token": None, "last_status": 0, "last_error": "",
                    "created_at": T0 + 80, "sent_at": T0 + 81}],
}


def insert_rows(c: Connection) -> None:
    """The rows, parents first, through release 1's tables (so types convert as release 1 wrote them)."""
    for table in OldBase.metadata.sorted_tables:
        if ROWS.get(table.name):
            c.execute(insert(table), ROWS[table.name])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.db"
        engine = create_engine(f"sqlite:///{path}")
        OldBase.metadata.create_all(engine)  # exactly what release 1's Index() did
        with engine.begin() as c:
            insert_rows(c)
        engine.dispose()
        con = sqlite3.connect(path)
        statements = list(con.iterdump())
        con.close()
    # create_all emits a table's indexes in set order (varies per run): sort them so the dump is reproducible
    indexes = sorted(s for s in statements if s.startswith("CREATE INDEX"))
    rest = [s for s in statements if not s.startswith("CREATE INDEX") and s != "COMMIT;"]
    text = "\n".join([*rest, *indexes, "COMMIT;"]) + "\n"
    header = ("-- An index database as dicomnode release 1 (before Alembic) created it, with synthetic rows (no PHI).\n"
              "-- Made by tests/data/make_index_v1.py (sqlite3 iterdump); loaded by tests/test_migrations.py.\n")
    DUMP.write_text(header + text, encoding="utf-8")
    print(f"wrote {DUMP} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
