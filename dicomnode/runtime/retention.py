"""Retention: the spool and work files of delivered study versions are purged; the index keeps the record.

Why: a node that runs for years receives far more than its disk holds, and
once a version's report is in the PACS its received images and intermediate
volumes serve nobody here (the PACS keeps the images). What stays: every
index row (studies, versions, series, instances, reports, deliveries, events)
and the report objects under ``reports/`` (small; the dashboard shows them and
a re-send or a confirmation needs them). docs/retention.md is the operator's
version of this text.

What "purging version N" of a study removes: the spool files of the
instances that *arrived in* N (``instances.version == N``) and N's work
directory ``work/study-<id>/v<N>/``. A later version reads every earlier
arrival too, so N is purged only when every later version of the study is
delivered as well.

Delivered: the version is complete, every pipeline step is done (dispatch
included), and every delivery of its report objects is ``sent`` with a
confirmation that is neither ``awaiting`` nor ``failed`` (``confirmed``, or
``unconfirmed`` for a destination with ``confirm = "none"``). A version with
no delivery rows (no destination configured, or no report to send) is
delivered once its dispatch step is done. Its delivery time is the latest of
the dispatch step's end and its deliveries' send and confirmation times.

Rules, oldest delivered first: a version delivered more than
``retention_days`` ago goes (0: never by age); while free space in
``data_dir`` is under ``retention_min_free_disk_mb``, younger delivered
versions go too, until the projected free space is above it again (0: rule
off). The projection counts the blocks the files occupied, so a dry run and
the pass that follows it name the same versions.

Concurrency (the serve loop and an operator's ``dicomnode purge`` at once):
a version is claimed by a conditional UPDATE of ``study_versions.purged_at``
(NULL -> the claim time) that also requires no unfinished later version of
the study, so one process deletes each file and the other skips the version.
The claim commits before any file goes, so from then on assembly and the
stages leave those instances out (``Index.version_files``): a late series
that opens a new version after a purge is processed with what the node
still has. The "purged" event is written with the final ``purged_at`` in one
transaction after the files are gone; a claim that never got its event (the
process died mid-purge) is taken over by a later pass after
``CLAIM_LEASE_S``.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import exists, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from dicomnode.config import Settings
from dicomnode.index.jobs import DONE, STAGES
from dicomnode.index.schema import COMPLETE, Delivery, EventRow, Instance, Job, StudyVersion
from dicomnode.index.studies import Index
from dicomnode.spool import Spool
from dicomnode.stages.dispatch import AWAITING, SENT

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DAY_S = 86400.0
# A claim this old without its "purged" event belongs to a purge that died; the next pass finishes it.
# Purging one version takes milliseconds to seconds, so a live purge is never taken over.
CLAIM_LEASE_S = 600.0
PURGED_EVENT = "purged"
AGE, DISK, INTERRUPTED = "age", "disk", "interrupted"  # why a version went

# Confirmations of a sent row that do not (yet) count as delivered: the answer is still to come (a "not found"
# re-sends the report). A FAILED confirmation (the PACS accepted the C-STORE but cannot or will not confirm,
# e.g. it refuses C-FIND: the default confirm = "find" at such a site fails for every delivery) counts as
# delivered: otherwise such a site never purges and fills its disk. The report objects a re-send needs are
# never purged; only the inputs (spool) and work files go.
NOT_DELIVERED_CONFIRMATIONS = (AWAITING,)

_LATER = aliased(StudyVersion)


@dataclass(frozen=True)
class PurgedVersion:
    """One version purged (or, in a dry run, that would be); ids only, never patient data."""

    version_id: int
    study_id: int
    version: int
    reason: str  # age | disk | interrupted
    delivered_at: float | None
    files: int  # spool and work files removed
    bytes: int  # disk space they occupied (allocated blocks)


@dataclass
class PurgeReport:
    """What one pass did (or would do); ``lines()`` for people, ``to_json()`` for ``dicomnode purge --json``."""

    dry_run: bool
    now: float
    retention_days: float
    min_free_disk_mb: int
    free_bytes_before: int
    free_bytes_after: int = 0  # measured after a real pass; projected in a dry run
    versions: list[PurgedVersion] = field(default_factory=list)
    kept_delivered: int = 0  # delivered, neither old enough nor needed for disk space
    kept_undelivered: int = 0  # unfinished, undelivered, or a later version of the study is
    lost_claims: int = 0  # another purge took them first (it deletes their files)
    errors: int = 0  # files or folders that could not be removed (permissions): left in place

    @property
    def bytes_freed(self) -> int:
        return sum(v.bytes for v in self.versions)

    @property
    def files_removed(self) -> int:
        return sum(v.files for v in self.versions)

    @property
    def still_short(self) -> bool:
        """Free space is still under the disk rule's mark: nothing more that is delivered could go."""
        return self.min_free_disk_mb > 0 and self.free_bytes_after < self.min_free_disk_mb * MIB

    def lines(self) -> list[str]:
        verb = "would purge" if self.dry_run else "purged"
        why = _reasons(self.retention_days, self.min_free_disk_mb)
        out = []
        for v in self.versions:
            when = "delivery time unknown" if v.delivered_at is None else \
                f"delivered {_iso(v.delivered_at)}, {(self.now - v.delivered_at) / DAY_S:.1f} days ago"
            out.append(f"{verb} study {v.study_id} version {v.version} (version id {v.version_id}): "
                       f"{v.files} file(s), {_size(v.bytes)}; {when}; {why.get(v.reason, v.reason)}")
        if self.versions:
            total = (f"{'would free' if self.dry_run else 'freed'} {_size(self.bytes_freed)} in "
                     f"{len(self.versions)} version(s), {self.files_removed} file(s)")
        else:
            total = "nothing to purge"
        total += (f"; free disk {'would be ' if self.dry_run else ''}{self.free_bytes_after // MIB} MiB; kept "
                  f"{self.kept_delivered} delivered and {self.kept_undelivered} undelivered version(s)")
        if self.still_short:
            total += (f"; still under retention_min_free_disk_mb={self.min_free_disk_mb}: nothing more that is "
                      f"delivered can go")
        if self.lost_claims:
            total += f"; {self.lost_claims} taken by another purge running now"
        if self.errors:
            total += f"; {self.errors} file(s) could not be removed (see the log)"
        return out + [total]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(schema="dicomnode.purge/1", bytes_freed=self.bytes_freed, files_removed=self.files_removed,
                   now=_iso(self.now))
        for v in doc["versions"]:
            v["delivered_at"] = _iso(v["delivered_at"])
        return doc


def _reasons(retention_days: float, min_free_disk_mb: int) -> dict[str, str]:
    return {AGE: f"delivered more than {retention_days:g} days ago",
            DISK: f"free disk under retention_min_free_disk_mb={min_free_disk_mb}",
            INTERRUPTED: "finishing an interrupted purge"}


@dataclass(frozen=True)
class _Candidate:
    version_id: int
    study_id: int
    version: int
    delivered_at: float | None
    later_delivered: tuple[int, ...] = ()  # the study's later unpurged versions, all judged delivered
    claimed_at: float | None = None  # an interrupted purge's claim, to take over


def purge(settings: Settings, index: Index, *, dry_run: bool = False, now: float | None = None,
          stop: threading.Event | None = None) -> PurgeReport:
    """One purge pass; returns a report whose ``lines()`` say what went (or would go) and why.

    ``now`` is the time the age rule measures against (tests and an operator's
    "what would go next week" pass it); claims and ``purged_at`` use the clock.
    A dry run reads the same rows and measures the same files, and changes
    nothing. Safe to run from several processes at once (module docstring).
    ``stop`` (the serve loop's): once set, the pass ends after the version in
    hand, so a node shutting down does not wait for a long backlog.
    """
    now = time.time() if now is None else now
    data = settings.data_path
    free0 = _free_bytes(data)
    report = PurgeReport(dry_run=dry_run, now=now, retention_days=settings.retention_days,
                         min_free_disk_mb=settings.retention_min_free_disk_mb, free_bytes_before=free0)
    spool = Spool(data, fsync=False)
    touched_days: set[Path] = set()
    plan: list[tuple[_Candidate, str]] = [(c, INTERRUPTED) for c in _interrupted(index, time.time())]
    younger: list[_Candidate] = []
    if settings.retention_days > 0 or settings.retention_min_free_disk_mb > 0:
        candidates, report.kept_undelivered = _candidates(index)
        age_limit = now - settings.retention_days * DAY_S if settings.retention_days > 0 else None
        for c in candidates:
            old = age_limit is not None and c.delivered_at is not None and c.delivered_at <= age_limit
            if old:
                plan.append((c, AGE))
            else:
                younger.append(c)
    need = settings.retention_min_free_disk_mb * MIB - free0  # bytes to free for the disk rule; <= 0: none
    freed = 0
    for cand, reason in plan:
        if stop is not None and stop.is_set():
            break
        done = _purge_version(settings, index, spool, cand, reason, dry_run, report, touched_days)
        if done is not None:
            freed += done.bytes
    for i, cand in enumerate(younger):  # oldest delivered first
        if settings.retention_min_free_disk_mb <= 0 or freed >= need or (stop is not None and stop.is_set()):
            report.kept_delivered += len(younger) - i
            break
        done = _purge_version(settings, index, spool, cand, DISK, dry_run, report, touched_days)
        if done is not None:
            freed += done.bytes
    if not dry_run:
        _remove_empty_days(spool, touched_days)
        report.free_bytes_after = _free_bytes(data)
    else:
        report.free_bytes_after = free0 + freed
    return report


def _candidates(index: Index) -> tuple[list[_Candidate], int]:
    """Delivered versions that may go, oldest delivered first; and how many unpurged versions may not.

    Three reads (versions, then steps, then deliveries: a dispatch step is done
    only after its delivery rows exist, so this order never sees a done step
    without its deliveries). A version that appears after these reads is
    caught by the claim's own condition.
    """
    with index.engine.connect() as c:
        versions = c.execute(select(StudyVersion.id, StudyVersion.study_id, StudyVersion.version,
                                    StudyVersion.state).where(StudyVersion.purged_at.is_(None))).all()
        steps: dict[int, dict[str, tuple[str, float | None]]] = defaultdict(dict)
        for vid, stage, state, finished in c.execute(
                select(Job.version_id, Job.stage, Job.state, Job.finished_at)
                .join(StudyVersion, StudyVersion.id == Job.version_id).where(StudyVersion.purged_at.is_(None))):
            steps[vid][stage] = (state, finished)
        sends: dict[int, list[Any]] = defaultdict(list)
        for row in c.execute(
                select(Delivery.version_id, Delivery.state, Delivery.confirmation, Delivery.sent_at,
                       Delivery.confirmed_at)
                .join(StudyVersion, StudyVersion.id == Delivery.version_id)
                .where(StudyVersion.purged_at.is_(None))):
            sends[row.version_id].append(row)
    delivered: dict[int, float | None] = {}
    for vid, _sid, _ver, state in versions:
        st = steps.get(vid, {})
        if state != COMPLETE or any(s not in st for s in STAGES) or any(s != DONE for s, _ in st.values()):
            continue
        rows = sends.get(vid, [])
        if any(r.state != SENT or r.confirmation in NOT_DELIVERED_CONFIRMATIONS for r in rows):
            continue
        times = [t for _, t in st.values() if t is not None]
        times += [t for r in rows for t in (r.sent_at, r.confirmed_at) if t is not None]
        delivered[vid] = max(times) if times else None
    by_study: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for vid, sid, ver, _state in versions:
        by_study[sid].append((ver, vid))
    out = []
    for vid, sid, ver, _state in versions:
        if vid not in delivered:
            continue
        later = tuple(v for n, v in by_study[sid] if n > ver)
        if all(v in delivered for v in later):
            out.append(_Candidate(vid, sid, ver, delivered[vid], later))
    out.sort(key=lambda c: (c.delivered_at if c.delivered_at is not None else 0.0, c.version_id))
    return out, len(versions) - len(out)


def _interrupted(index: Index, clock: float) -> list[_Candidate]:
    """Claims older than the lease with no "purged" event: their purge died between claim and event."""
    with index.engine.connect() as c:
        rows = c.execute(
            select(StudyVersion.id, StudyVersion.study_id, StudyVersion.version, StudyVersion.purged_at)
            .where(StudyVersion.purged_at.is_not(None), StudyVersion.purged_at < clock - CLAIM_LEASE_S,
                   ~exists().where(EventRow.version_id == StudyVersion.id, EventRow.kind == PURGED_EVENT))
            .order_by(StudyVersion.purged_at)).all()
    return [_Candidate(vid, sid, ver, None, claimed_at=at) for vid, sid, ver, at in rows]


def _unfinished_later(cand: _Candidate) -> Any:
    """A later, unpurged version of the study that was not judged delivered (one opened meanwhile, say)."""
    return exists().where(_LATER.study_id == cand.study_id, _LATER.version > cand.version,
                          _LATER.purged_at.is_(None), _LATER.id.not_in(cand.later_delivered))


def _claim(index: Index, cand: _Candidate, reason: str, at: float) -> bool:
    """Take the version for this process; False when another purge has it or the study moved on.

    One statement per transaction: on SQLite it takes the write lock at once
    (the condition is evaluated under it, so it cannot miss a version opened
    by another connection); on PostgreSQL a version opened by a transaction
    still in flight is caught by the re-check after the commit.
    """
    with index.engine.begin() as c:
        if reason == INTERRUPTED:
            res = c.execute(update(StudyVersion).where(StudyVersion.id == cand.version_id,
                                                       StudyVersion.purged_at == cand.claimed_at)
                            .values(purged_at=at))
            return res.rowcount == 1  # type: ignore[attr-defined,no-any-return]
        res = c.execute(update(StudyVersion).where(StudyVersion.id == cand.version_id,
                                                   StudyVersion.purged_at.is_(None), ~_unfinished_later(cand))
                        .values(purged_at=at))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return False
    with index.engine.begin() as c:
        if c.execute(select(_unfinished_later(cand))).scalar():
            c.execute(update(StudyVersion).where(StudyVersion.id == cand.version_id, StudyVersion.purged_at == at)
                      .values(purged_at=None))
            return False
    return True


def _purge_version(settings: Settings, index: Index, spool: Spool, cand: _Candidate, reason: str, dry_run: bool,
                   report: PurgeReport, touched_days: set[Path]) -> PurgedVersion | None:
    """Claim one version, remove its files, record it; in a dry run only measure them."""
    claimed_at = time.time()
    if not dry_run and not _claim(index, cand, reason, claimed_at):
        if reason == INTERRUPTED or _is_claimed(index, cand.version_id):
            report.lost_claims += 1
        else:
            report.kept_undelivered += 1
        return None
    with index.engine.connect() as c:
        rels = c.execute(select(Instance.path).where(Instance.study_id == cand.study_id,
                                                     Instance.version == cand.version).order_by(Instance.id)
                         ).scalars().all()
    tally = _Tally(dry_run)
    for rel in rels:
        try:
            path = spool.path(rel)
        except ValueError:  # an index row pointing outside the spool store: never followed
            log.warning("retention: study %d version %d: an instance path outside the spool store; left alone",
                        cand.study_id, cand.version)
            continue
        if tally.file(path):
            touched_days.add(path.parent)
    work = _work_dir(settings, cand.study_id, cand.version)
    tally.tree(work)
    done = PurgedVersion(cand.version_id, cand.study_id, cand.version, reason, cand.delivered_at, tally.files,
                         tally.bytes)
    report.errors += tally.errors
    if dry_run:
        report.versions.append(done)
        return done
    why = _reasons(settings.retention_days, settings.retention_min_free_disk_mb)[reason]
    finished = time.time()
    all_gone = False
    with index.engine.begin() as c:
        mine = c.execute(update(StudyVersion).where(StudyVersion.id == cand.version_id,
                                                    StudyVersion.purged_at == claimed_at)
                         .values(purged_at=finished)).rowcount == 1  # type: ignore[attr-defined]
        if mine:
            c.execute(insert(EventRow).values(
                at=finished, kind=PURGED_EVENT, study_id=cand.study_id, version_id=cand.version_id,
                message=f"study {cand.study_id} version {cand.version}: {tally.files} file(s) purged, "
                        f"{_size(tally.bytes)} freed ({why}); the index keeps the record, the report is kept",
                detail={"files": tally.files, "bytes": tally.bytes, "reason": reason, "errors": tally.errors}))
            all_gone = not _has_unpurged(c, cand.study_id)
    if not mine:  # taken over after our lease ran out (a very slow disk): its pass records it
        report.lost_claims += 1
        return None
    if all_gone:  # nothing of the study left to work on: its folder goes too (a new version makes it again)
        _rmdir(work.parent)
    if tally.errors:
        log.warning("retention: study %d version %d: %d file(s) could not be removed", cand.study_id,
                    cand.version, tally.errors)
    report.versions.append(done)
    return done


def _is_claimed(index: Index, version_id: int) -> bool:
    with index.engine.connect() as c:
        return c.execute(select(StudyVersion.purged_at).where(StudyVersion.id == version_id)).scalar() is not None


def _has_unpurged(c: Connection, study_id: int) -> bool:
    return bool(c.execute(select(exists().where(StudyVersion.study_id == study_id,
                                                StudyVersion.purged_at.is_(None)))).scalar())


def _work_dir(settings: Settings, study_id: int, version: int) -> Path:
    """The version's work folder, as ``StageContext.work_dir`` names it (built from ids, never from a UID)."""
    return settings.data_path / "work" / f"study-{study_id}" / f"v{version}"


class _Tally:
    """Removes (or, in a dry run, only measures) files, counting what they occupied; a file already gone is no error."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.files = 0
        self.bytes = 0
        self.errors = 0

    def file(self, path: Path) -> bool:
        try:
            st = os.lstat(path)  # a link is removed as a link, never followed
            if not self.dry_run:
                os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self.errors += 1
            log.warning("retention: cannot remove a file (%s)", type(exc).__name__)
            return False
        self.files += 1
        self.bytes += st.st_blocks * 512
        return True

    def tree(self, root: Path) -> None:
        try:
            entries = list(os.scandir(root))
        except FileNotFoundError:
            return
        except OSError as exc:
            self.errors += 1
            log.warning("retention: cannot read a work folder (%s)", type(exc).__name__)
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                self.tree(Path(e.path))
            else:
                self.file(Path(e.path))
        if not self.dry_run:
            _rmdir(root)


def _rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:  # gone, or not empty (something new arrived): either way not ours to force
        pass


def _remove_empty_days(spool: Spool, days: set[Path]) -> None:
    """Empty ``spool/store/YYYYMMDD`` folders of past days go; today's and yesterday's may be receiving (UTC)."""
    keep = {time.strftime("%Y%m%d", time.gmtime(time.time() - d * DAY_S)) for d in (0, 1)}
    store = spool.store.resolve()
    for d in days:
        if d.parent == store and d.name.isdigit() and len(d.name) == 8 and d.name not in keep:
            _rmdir(d)


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except FileNotFoundError:
        return 0


def _size(n: int) -> str:
    """Bytes for people: the unit that keeps a figure readable (0.1 MiB of a small version is not "0.0")."""
    for unit, scale in (("GiB", MIB * 1024), ("MiB", MIB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class RetentionLoop:
    """Runs :func:`purge` every ``retention_interval_s`` in the serve process (the first pass at start).

    A pass that fails is logged (the first with its traceback, repeats as one
    line) and the loop goes on: retention must never stop the node.
    """

    def __init__(self, settings: Settings, index: Index) -> None:
        self.settings = settings
        self.index = index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0  # finished passes, failed ones included: for status pages and tests
        self.failures = 0
        self.last_report: PurgeReport | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicomnode-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the pass in progress; a version it had claimed but not finished is finished by a later pass."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        streak = 0
        short = False
        while not self._stop.is_set():
            try:
                report = purge(self.settings, self.index, stop=self._stop)
                self.last_report = report
                if report.versions:
                    log.info("retention: purged %d version(s), %d file(s), %s freed; %d MiB free in data_dir",
                             len(report.versions), report.files_removed, _size(report.bytes_freed),
                             report.free_bytes_after // MIB)
                if report.still_short and not short:  # once per episode, not once per pass
                    log.warning("retention: free disk %d MiB is still under retention_min_free_disk_mb=%d and no "
                                "other delivered version can go", report.free_bytes_after // MIB,
                                report.min_free_disk_mb)
                short = report.still_short
                if streak:
                    log.info("retention passes work again after %d failure(s)", streak)
                streak = 0
            except Exception as exc:  # never let one bad pass end retention
                streak += 1
                self.failures += 1
                if streak == 1:
                    log.exception("retention pass failed; next in %.0f s", self.settings.retention_interval_s)
                else:
                    log.warning("retention pass failed again (%d in a row): %s", streak, type(exc).__name__)
            self.passes += 1
            self._stop.wait(self.settings.retention_interval_s)
