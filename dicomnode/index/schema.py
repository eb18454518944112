"""The index's schema: ONE SQLAlchemy metadata for every table the node keeps.

Why one: a schema that several owners create piecemeal (each in its own
constructor) cannot be migrated as a whole; Alembic's migrations
(``dicomnode/index/migrations``) describe this metadata, and start-up
(``dicomnode.index.migrate``) brings the database to the head revision, or
refuses, before anything reads or writes.

This metadata must always equal the head revision: a change here comes with a
new revision in ``migrations/versions`` (``tests/test_migrations.py`` compares
the two on SQLite and PostgreSQL). Tables are never made with ``create_all``
outside tests.

Times are stored as UNIX epoch seconds (floats) so quiet-period arithmetic is
plain and time-zone free.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy import Index as SqlIndex
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Release 1's marker in ``meta.schema_version`` (it made its tables with create_all). A database with
# this marker and no ``alembic_version`` is stamped as revision 0001; since Alembic, ``meta.schema_version``
# mirrors the Alembic revision and ``alembic_version`` is the authority (see dicomnode.index.migrate).
SCHEMA_VERSION = 1

# Study version states. Later stages (the pipeline) add their own after COMPLETE.
RECEIVING = "receiving"
COMPLETE = "complete"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class StudyVersion(Base):
    """One hand-off of a study: instances that arrive after a version completed open the next one."""

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
    # when retention removed this version's files (NULL: not purged); revision 0002
    purged_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)  # study version it arrived in
    gradable: Mapped[bool] = mapped_column(Boolean)
    path: Mapped[str] = mapped_column(String(255), unique=True)  # relative to data_dir, node-generated
    size_bytes: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[float] = mapped_column(Float)
    calling_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    peer_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)


class VersionSeries(Base):
    """The role a series plays in one study version, with the evidence that decided it."""

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


class EventRow(Base):
    """Event log: what happened to which study, for operators (no PHI in ``message``)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    version_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # indexed since 0002
    message: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class OwnObject(Base):
    """An object the node itself made (report SR, summary image).

    A PACS that routes whole studies (or every stable series) sends our own
    reports back to us; they must not open a new study version, or every
    report would trigger the next one.
    """

    __tablename__ = "own_objects"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    returned: Mapped[int] = mapped_column(Integer, default=0)


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Job(Base):
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
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # last time a message was queued for it
    holder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ReportRow(Base):
    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("study_versions.id"), unique=True)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    version: Mapped[int] = mapped_column(Integer)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sr_series_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    files: Mapped[list[Any]] = mapped_column(JSON)  # relative to data_dir
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class Delivery(Base):
    """One object owed to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_deliveries_destination_sop"),
        SqlIndex("ix_deliveries_due", "state", "next_attempt_at"),
        SqlIndex("ix_deliveries_confirm_due", "confirmation", "confirm_next_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    version_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    destination: Mapped[str] = mapped_column(String(128))  # DestinationSettings.name, AET@host:port
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))  # relative to settings.data_path; node-generated
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    claimed_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    claim_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Confirmed delivery (revision 0003; dicomnode.dicom.commit): whether the PACS vouched for what it took.
    # NULL while not sent (and on rows sent before 0003: shown as unconfirmed); else awaiting | confirmed |
    # unconfirmed (confirm = "none") | failed (the PACS cannot or will not say; confirm_error says why).
    confirmation: Mapped[str | None] = mapped_column(String(16), nullable=True)
    confirm_txn_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the last N-ACTION's
    confirm_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    confirm_next_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # ask (again) from then
    confirm_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    confirmed_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine with the durability settings the index relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    return engine
