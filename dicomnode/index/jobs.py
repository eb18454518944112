"""Pipeline steps as rows in the index: the record that work exists, whatever Celery holds.

One row per (study version, stage). A Celery message only says "look at this
row"; the row says whether the step still needs doing, who is doing it and how
often it was delivered. That is what makes every step idempotent (a second
delivery of a finished step does nothing), lets the node re-queue whatever a
dead worker left (reconcile), and parks a step that keeps killing its worker
instead of looping forever (``max_deliveries``).

Claims are conditional UPDATEs on the row's delivery count, so two workers
that receive the same message (a Redis redelivery, a reconcile racing a slow
worker) cannot both run the step, on SQLite or PostgreSQL alike.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update

from dicomnode.index.schema import EventRow, Job
from dicomnode.index.studies import Index

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("convert", "preprocess", "infer", "report", "dispatch")
QUEUE_OF: dict[str, str] = {"convert": "cpu", "preprocess": "cpu", "infer": "gpu", "report": "cpu", "dispatch": "cpu"}

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


def holder_id() -> str:
    """Who is running a step: host and process, so a dead local process can be recognised at once."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str | None) -> bool:
    """True when the holder is a process on THIS host that no longer exists.

    A holder on another host cannot be checked from here: its lease (the hard
    time limit) decides instead.
    """
    if not holder:
        return True
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Claim:
    """The answer to "may I run this step now?": ``run`` or why not."""

    outcome: str  # "run" | "done" | "failed" | "busy" | "parked" | "missing"
    study_id: int = 0
    deliveries: int = 0


@dataclass(frozen=True)
class JobRef:
    version_id: int
    stage: str


class Jobs:
    def __init__(self, index: Index) -> None:
        self.index = index

    def create(self, version_id: int, study_id: int, stage: str, now: float | None = None) -> bool:
        """Add a pending step (no-op if it exists). Returns True if it was new."""
        with self.index.engine.begin() as c:
            exists = c.execute(select(Job.id).where(Job.version_id == version_id, Job.stage == stage)).first()
            if exists:
                return False
            c.execute(insert(Job).values(version_id=version_id, study_id=study_id, stage=stage, state=PENDING,
                                         deliveries=0, created_at=now or time.time(), detail={}))
            return True

    def claim(self, version_id: int, stage: str, *, holder: str, lease_s: float, max_deliveries: int,
              now: float | None = None) -> Claim:
        now = now or time.time()
        for _ in range(5):
            with self.index.engine.begin() as c:
                row = c.execute(select(Job.state, Job.deliveries, Job.holder, Job.lease_until, Job.study_id)
                                .where(Job.version_id == version_id, Job.stage == stage)).first()
                if row is None:
                    return Claim("missing")
                state, deliveries, old_holder, lease_until, study_id = row
                if state in (DONE, FAILED):
                    return Claim(state, study_id, deliveries)
                if state == RUNNING and (lease_until or 0) > now \
                        and not holder_is_dead(old_holder):
                    return Claim("busy", study_id, deliveries)
                n = deliveries + 1
                if n > max_deliveries:
                    err = (f"{stage} was delivered {n} times without finishing (its worker was lost each "
                           f"time, e.g. killed or out of memory); parked for an operator")
                    res = c.execute(update(Job).where(Job.version_id == version_id, Job.stage == stage,
                                                      Job.deliveries == deliveries)
                                    .values(state=FAILED, error=err, finished_at=now, deliveries=n, holder=None))
                    if res.rowcount != 1:  # type: ignore[attr-defined]
                        continue
                    c.execute(insert(EventRow).values(at=now, kind="step_parked", study_id=study_id,
                                                      version_id=version_id, message=f"study {study_id}: {err}",
                                                      detail={"stage": stage, "deliveries": n}))
                    return Claim("parked", study_id, n)
                res = c.execute(update(Job).where(Job.version_id == version_id, Job.stage == stage,
                                                  Job.deliveries == deliveries, Job.state.in_((PENDING, RUNNING)))
                                .values(state=RUNNING, deliveries=n, holder=holder, lease_until=now + lease_s,
                                        started_at=now))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    return Claim("run", study_id, n)
        return Claim("busy")

    def finish(self, version_id: int, stage: str, *, holder: str, seconds: float, detail: dict[str, Any],
               next_stage: str | None, now: float | None = None) -> bool:
        """Mark a step done and create the next one in the same transaction (nothing falls between)."""
        now = now or time.time()
        with self.index.engine.begin() as c:
            res = c.execute(update(Job).where(Job.version_id == version_id, Job.stage == stage,
                                              Job.state == RUNNING, Job.holder == holder)
                            .values(state=DONE, finished_at=now, seconds=seconds, detail=detail, error=None,
                                    holder=None, lease_until=None))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False  # someone took the step over meanwhile; theirs counts
            if next_stage:
                study_id = c.execute(select(Job.study_id).where(Job.version_id == version_id,
                                                                Job.stage == stage)).scalar_one()
                if c.execute(select(Job.id).where(Job.version_id == version_id, Job.stage == next_stage)).first() is None:
                    c.execute(insert(Job).values(version_id=version_id, study_id=study_id, stage=next_stage,
                                                 state=PENDING, deliveries=0, created_at=now, detail={}))
            return True

    def fail(self, version_id: int, stage: str, *, holder: str, error: str, seconds: float,
             now: float | None = None) -> None:
        now = now or time.time()
        with self.index.engine.begin() as c:
            res = c.execute(update(Job).where(Job.version_id == version_id, Job.stage == stage,
                                              Job.holder == holder, Job.state == RUNNING)
                            .values(state=FAILED, error=error[:4000], finished_at=now, seconds=seconds,
                                    holder=None, lease_until=None))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                study_id = c.execute(select(Job.study_id).where(Job.version_id == version_id,
                                                                Job.stage == stage)).scalar_one()
                c.execute(insert(EventRow).values(at=now, kind="step_failed", study_id=study_id,
                                                  version_id=version_id,
                                                  message=f"study {study_id}: {stage} failed: {error[:300]}",
                                                  detail={"stage": stage}))

    def retry(self, version_id: int | None = None) -> list[JobRef]:
        """Operator action: failed steps back to pending, with a fresh delivery count.

        ``sent_at`` is cleared too: the periodic reconcile re-sends a pending step only once its last message
        is older than the broker's visibility timeout (an hour), so a retried step that kept its old
        ``sent_at`` would wait that long; with none it is queued at the next reconcile.
        """
        with self.index.engine.begin() as c:
            q = select(Job.version_id, Job.stage).where(Job.state == FAILED)
            if version_id is not None:
                q = q.where(Job.version_id == version_id)
            refs = [JobRef(v, s) for v, s in c.execute(q).all()]
            for r in refs:
                c.execute(update(Job).where(Job.version_id == r.version_id, Job.stage == r.stage)
                          .values(state=PENDING, deliveries=0, error=None, holder=None, lease_until=None,
                                  sent_at=None))
        return refs

    def mark_sent(self, version_id: int, stage: str, now: float | None = None) -> None:
        with self.index.engine.begin() as c:
            c.execute(update(Job).where(Job.version_id == version_id, Job.stage == stage)
                      .values(sent_at=now or time.time()))

    def unfinished(self, now: float | None = None, pending_resend_after_s: float | None = None) -> list[JobRef]:
        """Steps to (re-)queue: running ones whose worker is gone or past its lease, and pending ones.

        ``pending_resend_after_s`` None: every pending step (start-up, when the
        queue may have been lost with the process); else only those whose last
        message is older than that (a broker that lost its queue), so a long
        queue is not flooded with duplicates.
        """
        now = now or time.time()
        with self.index.engine.connect() as c:
            rows = c.execute(select(Job.version_id, Job.stage, Job.state, Job.holder, Job.lease_until, Job.sent_at,
                                    Job.started_at)
                             .where(Job.state.in_((PENDING, RUNNING))).order_by(Job.id)).all()
        out = []
        for version_id, stage, state, holder, lease_until, sent_at, started_at in rows:
            stale = pending_resend_after_s is None or (sent_at or 0) <= now - pending_resend_after_s
            if state == PENDING:
                if stale:
                    out.append(JobRef(version_id, stage))
            elif (lease_until or 0) <= now or holder_is_dead(holder):
                # lost with its worker: one new message, not one per pass
                if stale or (sent_at or 0) <= (started_at or 0):
                    out.append(JobRef(version_id, stage))
        return out

    def of_version(self, version_id: int) -> dict[str, dict[str, Any]]:
        with self.index.engine.connect() as c:
            rows = c.execute(select(Job).where(Job.version_id == version_id).order_by(Job.id)).mappings().all()
        return {r["stage"]: {"state": r["state"], "deliveries": r["deliveries"], "error": r["error"],
                             "seconds": r["seconds"], "detail": r["detail"]} for r in rows}

    def all_by_version(self) -> dict[int, dict[str, dict[str, Any]]]:
        out: dict[int, dict[str, dict[str, Any]]] = {}
        with self.index.engine.connect() as c:
            rows = c.execute(select(Job.version_id, Job.stage, Job.state, Job.deliveries, Job.error, Job.seconds)
                             .order_by(Job.id)).all()
        for version_id, stage, state, deliveries, error, seconds in rows:
            out.setdefault(version_id, {})[stage] = {"state": state, "deliveries": deliveries, "error": error,
                                                     "seconds": seconds}
        return out
