"""The index: the authoritative record of every instance, series, study and study version.

A relational database through SQLAlchemy: a SQLite file under ``data_dir`` by
default (WAL, ``synchronous=FULL`` so a committed row survives power loss), a
PostgreSQL URL when several hosts share the work. Celery and timers are never
the only record that something exists: assembly re-reads its state from here,
so a restart loses nothing that was acknowledged.

Times are stored as UNIX epoch seconds (floats) so quiet-period arithmetic is
plain and time-zone free.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.index import migrate as _migrate
from dicomnode.index.schema import (COMPLETE, RECEIVING, EventRow, Instance, OwnObject, Series, Study, StudyVersion,
                                    VersionSeries, make_engine)
from dicomnode.logs import uid_tag

log = logging.getLogger(__name__)

# An instance joined to the version it arrived in (whose ``purged_at`` says whether its file is kept).
_ARRIVED_IN = and_(StudyVersion.study_id == Instance.study_id, StudyVersion.version == Instance.version)

# Statements of the per-instance hot path, built once (SQLAlchemy caches their compilation).
_KNOWN_SOP = select(Instance.id).where(Instance.sop_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = insert(Instance)
_BUMP_VERSION = (
    update(StudyVersion)
    .where(StudyVersion.study_id == bindparam("sid"), StudyVersion.state == RECEIVING)
    .values(last_instance_at=bindparam("now"), new_instances=StudyVersion.new_instances + 1)
    .returning(StudyVersion.version)
)


class UidConflict(ValueError):
    """An instance whose series UID the index already holds under another study.

    Permanent: a series belongs to one study (PS3.3 C.7.3.1), so the same
    bytes can never be stored; the listener answers a 0xCxxx status rather
    than 0xA700, which a PACS would retry forever. Carries index ids only
    (never UIDs) for the event log.
    """

    def __init__(self, held_by: int, arriving: int) -> None:
        super().__init__("series already belongs to another study")
        self.held_by = held_by
        self.arriving = arriving


@dataclass(frozen=True)
class InstanceMeta:
    """What the listener extracted from a received dataset's header."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    gradable: bool


@dataclass(frozen=True)
class StoreOutcome:
    duplicate: bool
    study_id: int
    version: int


@dataclass(frozen=True)
class DueVersion:
    version_id: int
    study_id: int
    version: int
    reason: str
    last_instance_at: float  # as seen when found due: completion is refused if it moved


@dataclass(frozen=True)
class VersionInfo:
    version_id: int
    study_id: int
    study_instance_uid: str
    version: int
    state: str
    completed_at: float | None


@dataclass(frozen=True)
class VersionInput:
    """A series of a completed version with its role and every stored instance (paths relative to data_dir)."""

    role: str
    status: str
    reason: str
    series_instance_uid: str
    series_number: int | None
    series_description: str | None
    instances: tuple[tuple[str, str, str], ...]  # (path, sop_class_uid, sop_instance_uid), arrival order


@dataclass(frozen=True)
class StoredFile:
    series_instance_uid: str
    sop_class_uid: str
    path: str
    gradable: bool


class BoundedCache(OrderedDict[tuple[str, str], Any]):
    """A small LRU map: keeps the hot path's id look-ups without growing with every study ever seen."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def get(self, key: tuple[str, str], default: Any = None) -> Any:  # type: ignore[override]
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: tuple[str, str], value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class Index:
    """Typed operations on the index; each method is one short transaction."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Open the index, first bringing its schema to this code's head revision.

        ``migrate=True`` (the node, workers, tests): run the migrations (a fresh
        database is created, a release-1 one adopted), safe when several
        processes start at once. ``migrate=False``: only check, for processes
        that must not change the schema (a read-only tool, or a site whose
        operators run ``dicomnode db upgrade`` themselves). Either way a database
        that is not at head afterwards raises ``migrate.SchemaError`` here,
        before anything reads or writes a row.
        """
        self.url = url
        self.engine = make_engine(url)
        try:
            if migrate:
                _migrate.upgrade(self.engine)
            else:
                _migrate.check_at_head(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # study/series UID -> ids; bounded, since a node runs for years
        self._ids: BoundedCache = BoundedCache(4096)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session() as s, s.begin():
            yield s

    # -- receiving -----------------------------------------------------------------

    def is_known_instance(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as c:
            return c.execute(_KNOWN_SOP, {"uid": sop_instance_uid}).first() is not None

    def add_own_objects(self, sop_instance_uids: Iterable[str], version_id: int | None) -> None:
        """Remember what the node made, BEFORE it is sent anywhere (so it is known when it comes back)."""
        now = time.time()
        with self.session() as s:
            for uid in sop_instance_uids:
                if s.get(OwnObject, uid) is None:
                    s.add(OwnObject(sop_instance_uid=uid, version_id=version_id, created_at=now, returned=0))

    def is_own_object(self, sop_instance_uid: str) -> bool:
        with self.engine.connect() as c:
            return c.execute(select(OwnObject.sop_instance_uid)
                             .where(OwnObject.sop_instance_uid == sop_instance_uid)).first() is not None

    def count_returned_own_object(self, sop_instance_uid: str, calling_ae: str | None, peer: str | None) -> None:
        with self.session() as s:
            s.execute(update(OwnObject).where(OwnObject.sop_instance_uid == sop_instance_uid)
                      .values(returned=OwnObject.returned + 1))
            s.add(EventRow(at=time.time(), kind="own_object_returned",
                           message=f"our own report {uid_tag(sop_instance_uid)} came back from {calling_ae}@{peer}; "
                                   f"acknowledged, not stored again, no new study version",
                           detail={"sop_instance_uid": sop_instance_uid}))

    def count_duplicate(self, sop_instance_uid: str, calling_ae: str | None, peer: str | None) -> None:
        """Keep the first copy; count the repeat so operators can see a PACS re-sending."""
        with self.session() as s:
            s.execute(
                update(Instance)
                .where(Instance.sop_instance_uid == sop_instance_uid)
                .values(duplicates=Instance.duplicates + 1)
            )
            study_id = s.scalar(select(Instance.study_id).where(Instance.sop_instance_uid == sop_instance_uid))
            s.add(
                EventRow(
                    at=time.time(),
                    kind="duplicate_instance",
                    study_id=study_id,
                    message=f"duplicate SOP instance {uid_tag(sop_instance_uid)} from {calling_ae}@{peer}; first copy kept",
                    detail={"sop_instance_uid": sop_instance_uid},
                )
            )

    def add_instance(
        self,
        meta: InstanceMeta,
        path: str,
        size_bytes: int,
        calling_ae: str | None,
        peer: str | None,
        now: float | None = None,
    ) -> StoreOutcome:
        """Record a durably written instance, attaching it to the study's open version.

        This runs once per received instance inside the association thread,
        so it is written in SQL expressions, not ORM objects, and study and
        series ids (immutable once created) are cached. Raises
        ``IntegrityError`` if another association indexed the same SOP
        Instance UID first; the caller then treats it as a duplicate.
        """
        for attempt in range(5):
            try:
                return self._add_instance(meta, path, size_bytes, calling_ae, peer, now or time.time())
            except IntegrityError:
                # Two associations creating the same study/series/version at
                # once: the retry sees the other's row. A duplicate SOP
                # instance is not retried.
                self._ids.clear()
                if attempt == 4 or self.is_known_instance(meta.sop_instance_uid):
                    raise
        raise AssertionError("unreachable")

    def _add_instance(
        self, meta: InstanceMeta, path: str, size: int, calling_ae: str | None, peer: str | None, now: float
    ) -> StoreOutcome:
        with self.engine.begin() as c:
            study_id = self._ids.get(("study", meta.study_instance_uid))
            if study_id is None:
                study_id = c.execute(
                    select(Study.id).where(Study.study_instance_uid == meta.study_instance_uid)
                ).scalar()
                if study_id is None:
                    study_id = c.execute(
                        insert(Study).values(study_instance_uid=meta.study_instance_uid, created_at=now).returning(Study.id)
                    ).scalar_one()
            series_key = ("series", meta.series_instance_uid)
            cached = self._ids.get(series_key)
            if cached is None:
                row = c.execute(
                    select(Series.id, Series.study_id).where(Series.series_instance_uid == meta.series_instance_uid)
                ).first()
                if row is None:
                    series_id = c.execute(
                        insert(Series)
                        .values(
                            study_id=study_id,
                            series_instance_uid=meta.series_instance_uid,
                            modality=meta.modality,
                            series_number=meta.series_number,
                            series_description=(meta.series_description or None) and meta.series_description[:128],
                            created_at=now,
                        )
                        .returning(Series.id)
                    ).scalar_one()
                    series_study = study_id
                else:
                    series_id, series_study = row
            else:
                series_id, series_study = cached
            if series_study != study_id:
                raise UidConflict(series_study, study_id)
            version = self._open_version(c, study_id, now)
            c.execute(
                _INSERT_INSTANCE,
                {
                    "sop_instance_uid": meta.sop_instance_uid,
                    "sop_class_uid": meta.sop_class_uid,
                    "transfer_syntax_uid": meta.transfer_syntax_uid,
                    "study_id": study_id,
                    "series_id": series_id,
                    "version": version,
                    "gradable": meta.gradable,
                    "path": path,
                    "size_bytes": size,
                    "received_at": now,
                    "calling_ae": calling_ae,
                    "peer_address": peer,
                    "duplicates": 0,
                },
            )
        # only after the commit: a rolled-back insert must not leave a stale id
        self._ids[("study", meta.study_instance_uid)] = study_id
        self._ids[series_key] = (series_id, study_id)
        return StoreOutcome(duplicate=False, study_id=study_id, version=version)

    @staticmethod
    def _open_version(c: Connection, study_id: int, now: float) -> int:
        """The receiving version of a study, bumped; a new one if the last was handed on.

        The conditional UPDATE is what makes completion and arrival race-free:
        the assembler only completes a version whose ``last_instance_at`` it
        saw, and an arrival only joins a version that is still receiving.
        """
        number = c.execute(_BUMP_VERSION, {"sid": study_id, "now": now}).scalar()
        if number is not None:
            return int(number)
        latest = c.execute(select(func.max(StudyVersion.version)).where(StudyVersion.study_id == study_id)).scalar()
        number = 1 if latest is None else int(latest) + 1
        c.execute(
            insert(StudyVersion).values(
                study_id=study_id,
                version=number,
                state=RECEIVING,
                opened_at=now,
                last_instance_at=now,
                new_instances=1,
            )
        )
        c.execute(
            insert(EventRow).values(
                at=now,
                kind="version_opened",
                study_id=study_id,
                message=f"study {study_id} version {number} receiving",
                detail={},
            )
        )
        return number

    def note_release(self, study_ids: Iterable[int], now: float | None = None) -> None:
        """A clean A-RELEASE from a sender of these studies (an abort never calls this)."""
        ids = list(set(study_ids))
        if not ids:
            return
        with self.session() as s:
            s.execute(
                update(StudyVersion)
                .where(StudyVersion.study_id.in_(ids), StudyVersion.state == RECEIVING)
                .values(released_at=now or time.time())
            )

    # -- assembly --------------------------------------------------------------------

    def due_versions(self, now: float, quiet_period_s: float, release_quiet_s: float | None) -> list[DueVersion]:
        """Receiving versions whose quiet period has passed (or whose sender released and went quiet)."""
        out: list[DueVersion] = []
        with self.session() as s:
            rows = s.scalars(select(StudyVersion).where(StudyVersion.state == RECEIVING)).all()
            for v in rows:
                if now - v.last_instance_at >= quiet_period_s:
                    out.append(DueVersion(v.id, v.study_id, v.version, "quiet_period", v.last_instance_at))
                elif (
                    release_quiet_s is not None
                    and v.released_at is not None
                    and v.released_at >= v.last_instance_at
                    and now - v.released_at >= release_quiet_s
                ):
                    out.append(DueVersion(v.id, v.study_id, v.version, "association_released", v.last_instance_at))
        return out

    def complete_version(self, due: DueVersion, assignments: Mapping[str, Mapping[str, Any]], now: float) -> bool:
        """Mark a version complete with its series roles, unless an instance arrived meanwhile."""
        with self.session() as s:
            res = s.execute(
                update(StudyVersion)
                .where(
                    StudyVersion.id == due.version_id,
                    StudyVersion.state == RECEIVING,
                    StudyVersion.last_instance_at == due.last_instance_at,
                )
                .values(state=COMPLETE, completed_at=now, complete_reason=due.reason)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False
            series_ids = dict(
                s.execute(
                    select(Series.series_instance_uid, Series.id).where(Series.study_id == due.study_id)
                ).all()
            )
            for series_uid, a in assignments.items():
                s.add(
                    VersionSeries(
                        version_id=due.version_id,
                        series_id=series_ids[series_uid],
                        role=a["role"],
                        status=a["status"],
                        reason=a["reason"],
                        evidence=list(a.get("evidence", [])),
                        chosen_over=list(a.get("chosen_over", [])),
                    )
                )
            roles = sorted(a["role"] for a in assignments.values() if a["status"] == "selected")
            # earlier versions' instances whose files retention purged are not part of this version's input
            purged = int(s.scalar(
                select(func.count(Instance.id))
                .join(StudyVersion, _ARRIVED_IN)
                .where(Instance.study_id == due.study_id, Instance.version < due.version,
                       StudyVersion.purged_at.is_not(None))
            ) or 0)
            note = f"; {purged} earlier instance(s) purged by retention, not in this version" if purged else ""
            s.add(
                EventRow(
                    at=now,
                    kind="version_complete",
                    study_id=due.study_id,
                    version_id=due.version_id,
                    message=f"study {due.study_id} version {due.version} complete ({due.reason}); "
                            f"roles: {', '.join(roles) or 'none'}{note}",
                    detail={"reason": due.reason, "roles": roles, **({"purged_instances": purged} if purged else {})},
                )
            )
            return True

    def version_files(self, study_id: int, version: int) -> list[StoredFile]:
        """Every instance a version covers whose file is still kept: it is processed as a whole.

        Earlier arrivals are included, except those of versions that retention
        purged (``study_versions.purged_at``; docs/retention.md): a late series
        after a purge opens a version that is processed with what the node
        still has, and never asks for a file that is gone.
        """
        with self.session() as s:
            rows = s.execute(
                select(Series.series_instance_uid, Instance.sop_class_uid, Instance.path, Instance.gradable)
                .join(Series, Series.id == Instance.series_id)
                .join(StudyVersion, _ARRIVED_IN)
                .where(Instance.study_id == study_id, Instance.version <= version, StudyVersion.purged_at.is_(None))
                .order_by(Instance.id)
            ).all()
        return [StoredFile(*r) for r in rows]

    def purged_instances(self, study_id: int, version: int) -> int:
        """How many instances a version covers whose files retention purged (they are not in its input)."""
        with self.session() as s:
            return int(s.scalar(
                select(func.count(Instance.id))
                .join(StudyVersion, _ARRIVED_IN)
                .where(Instance.study_id == study_id, Instance.version <= version, StudyVersion.purged_at.is_not(None))
            ) or 0)

    def _versions(self, *where: Any) -> list[VersionInfo]:
        with self.session() as s:
            rows = s.execute(
                select(StudyVersion.id, StudyVersion.study_id, Study.study_instance_uid, StudyVersion.version,
                       StudyVersion.state, StudyVersion.completed_at)
                .join(Study, Study.id == StudyVersion.study_id)
                .where(*where)
                .order_by(StudyVersion.id)
            ).all()
        return [VersionInfo(*r) for r in rows]

    def version_info(self, version_id: int) -> VersionInfo | None:
        found = self._versions(StudyVersion.id == version_id)
        return found[0] if found else None

    def completed_versions(self) -> list[VersionInfo]:
        return self._versions(StudyVersion.state == COMPLETE)

    def version_inputs(self, version_id: int) -> list[VersionInput]:
        """Every series of a completed version with its role; instances up to and including that version.

        Instances whose files retention purged are left out (see :meth:`version_files`), and so is a series
        left with none.
        """
        info = self.version_info(version_id)
        if info is None:
            return []
        with self.session() as s:
            series = s.execute(
                select(VersionSeries.role, VersionSeries.status, VersionSeries.reason, Series.id,
                       Series.series_instance_uid, Series.series_number, Series.series_description)
                .join(Series, Series.id == VersionSeries.series_id)
                .where(VersionSeries.version_id == version_id)
                .order_by(Series.id)
            ).all()
            out = []
            for role, status, reason, series_id, uid, number, desc in series:
                inst = s.execute(
                    select(Instance.path, Instance.sop_class_uid, Instance.sop_instance_uid)
                    .join(StudyVersion, _ARRIVED_IN)
                    .where(Instance.series_id == series_id, Instance.version <= info.version,
                           StudyVersion.purged_at.is_(None))
                    .order_by(Instance.id)
                ).all()
                if not inst:  # every file of the series purged: nothing of it to convert or cite
                    continue
                out.append(VersionInput(role, status, reason, uid, number, desc, tuple(tuple(r) for r in inst)))
        return out

    def known_paths(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(Instance.path)).all())

    def add_event(self, kind: str, message: str, study_id: int | None = None, **detail: Any) -> None:
        with self.session() as s:
            s.add(EventRow(at=time.time(), kind=kind, study_id=study_id, message=message, detail=detail))

    # -- reporting -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The documented ``dicomnode status --json`` document (see README: status schema)."""
        with self.session() as s:
            studies = s.scalars(select(Study).order_by(Study.id)).all()
            out_studies = []
            for st in studies:
                series_rows = s.scalars(select(Series).where(Series.study_id == st.id).order_by(Series.id)).all()
                counts = dict(
                    s.execute(
                        select(Instance.series_id, func.count(Instance.id))
                        .where(Instance.study_id == st.id)
                        .group_by(Instance.series_id)
                    ).all()
                )
                versions = s.scalars(
                    select(StudyVersion).where(StudyVersion.study_id == st.id).order_by(StudyVersion.version)
                ).all()
                any_purged = any(v.purged_at is not None for v in versions)
                out_versions = []
                for v in versions:
                    roles = {
                        vs.series_id: vs
                        for vs in s.scalars(select(VersionSeries).where(VersionSeries.version_id == v.id)).all()
                    }
                    purged_counts = dict(
                        s.execute(
                            select(Instance.series_id, func.count(Instance.id))
                            .join(StudyVersion, _ARRIVED_IN)
                            .where(Instance.study_id == st.id, Instance.version <= v.version,
                                   StudyVersion.purged_at.is_not(None))
                            .group_by(Instance.series_id)
                        ).all()
                    ) if any_purged else {}
                    per_version_counts = dict(
                        s.execute(
                            select(Instance.series_id, func.count(Instance.id))
                            .where(Instance.study_id == st.id, Instance.version <= v.version)
                            .group_by(Instance.series_id)
                        ).all()
                    )
                    out_series = []
                    for se in series_rows:
                        if se.id not in per_version_counts:
                            continue
                        vs = roles.get(se.id)
                        out_series.append(
                            {
                                "series_instance_uid": se.series_instance_uid,
                                "series_number": se.series_number,
                                "modality": se.modality,
                                "description": se.series_description,
                                "instances": per_version_counts[se.id],
                                "instances_purged": purged_counts.get(se.id, 0),
                                "role": vs.role if vs else None,
                                "status": vs.status if vs else None,
                                "reason": vs.reason if vs else None,
                                "evidence": list(vs.evidence) if vs else [],
                                "chosen_over": list(vs.chosen_over) if vs else [],
                            }
                        )
                    out_versions.append(
                        {
                            "version_id": v.id,
                            "version": v.version,
                            "state": v.state,
                            "opened_at": _iso(v.opened_at),
                            "last_instance_at": _iso(v.last_instance_at),
                            "completed_at": _iso(v.completed_at),
                            "complete_reason": v.complete_reason,
                            "new_instances": v.new_instances,
                            # retention (docs/retention.md): when this version's files went; the rows stay
                            "purged_at": _iso(v.purged_at),
                            "instances_purged": sum(purged_counts.values()),
                            "series": out_series,
                        }
                    )
                dup = s.scalar(select(func.coalesce(func.sum(Instance.duplicates), 0)).where(Instance.study_id == st.id))
                out_studies.append(
                    {
                        "id": st.id,
                        "study_instance_uid": st.study_instance_uid,
                        "instances": sum(counts.values()),
                        "duplicates": int(dup or 0),
                        "versions": out_versions,
                    }
                )
            return {"schema": "dicomnode.status/1", "generated_at": _iso(time.time()), "studies": out_studies}

    def recent_events(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.session() as s:
            rows = s.scalars(select(EventRow).order_by(EventRow.id.desc()).limit(limit)).all()
            return [
                {"at": _iso(r.at), "kind": r.kind, "study_id": r.study_id, "message": r.message, "detail": r.detail}
                for r in reversed(rows)
            ]


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"
