"""The REST API: JSON for scripts and other systems, the same documents the CLI prints.

Routes (OpenAPI at ``/openapi.json``):

- ``GET /api/status``: ``dicomnode status --json`` (``dicomnode.status/1``);
- ``GET /api/versions/{version_id}``: one version of that document, with its study's index id;
- ``GET /api/events?study=&kind=&since=&limit=``: the event log, newest ``limit`` matching, oldest first;
- ``POST /api/versions/{version_id}/retry``: the version's failed pipeline steps back to pending;
- ``POST /api/deliveries/{delivery_id}/retry``: a parked delivery back to pending.

Only index ids travel in paths and query strings, never a UID or a patient
attribute, so access logs and browser histories hold no patient data. The
operator actions here are the ones the dashboard's buttons call
(:func:`retry_version`, :func:`retry_delivery`), so both behave the same.
"""
from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select

from dicomnode.index.jobs import Jobs
from dicomnode.index.schema import Delivery, EventRow
from dicomnode.runtime.monitor import full_status
from dicomnode.stages.dispatch import Outbox
from dicomnode.web.state import WebState

log = logging.getLogger(__name__)

MAX_EVENTS = 10_000  # one answer's bound, whatever ``limit`` asks for


class NotFound(LookupError):
    """An id the index does not hold (answered 404)."""


class Conflict(RuntimeError):
    """An action that does not apply in the row's current state (answered 409)."""


def parse_since(value: str | None) -> float | None:
    """``since`` as UNIX seconds: a number (epoch) or ISO-8601 (naive = UTC, ``Z`` allowed); ValueError otherwise."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        t = float(text)
    except ValueError:
        try:
            when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"since {value!r} is neither UNIX seconds nor an ISO-8601 time "
                             "(e.g. 2026-01-02T03:04:05Z)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        return when.timestamp()
    if not math.isfinite(t):
        raise ValueError(f"since {value!r} is not a finite number")
    return t


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def events(state: WebState, *, study: int | None = None, kinds: list[str] | None = None, since: float | None = None,
           limit: int = 200) -> list[dict[str, Any]]:
    """The newest ``limit`` events that match, oldest first (the shape of ``dicomnode events --json``, plus ids)."""
    q = select(EventRow).order_by(EventRow.id.desc()).limit(max(1, min(limit, MAX_EVENTS)))
    if study is not None:
        q = q.where(EventRow.study_id == study)
    if kinds:
        q = q.where(EventRow.kind.in_(kinds))
    if since is not None:
        q = q.where(EventRow.at >= since)
    with state.index.session() as s:
        rows = s.scalars(q).all()
        return [{"id": r.id, "at": _iso(r.at), "kind": r.kind, "study_id": r.study_id, "version_id": r.version_id,
                 "message": r.message, "detail": r.detail} for r in reversed(rows)]


def event_kinds(state: WebState) -> list[str]:
    """Every kind the log holds, for the events page's filter."""
    with state.index.session() as s:
        return sorted(k for k in s.scalars(select(EventRow.kind).distinct()).all() if k)


def find_version(doc: dict[str, Any], version_id: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(study, version) of a status document by the version's index id."""
    for st in doc["studies"]:
        for v in st["versions"]:
            if v["version_id"] == version_id:
                return st, v
    return None


def retry_version(state: WebState, version_id: int) -> tuple[list[str], bool]:
    """Failed steps of one version back to pending (``dicomnode retry --version-id``), queued at once when we can.

    Returns the stages set back and whether they were queued here (False: the
    node's reconcile pass queues them); NotFound for an unknown version.
    """
    info = state.index.version_info(version_id)
    if info is None:
        raise NotFound(f"no study version {version_id}")
    refs = Jobs(state.index).retry(version_id)
    queued = False
    if refs:
        state.index.add_event("retry", f"operator retry of {len(refs)} failed step(s) (HTTP)", study_id=info.study_id,
                              version_id=version_id, stages=[r.stage for r in refs])
        log.info("study %d version %d: operator retry of %s (HTTP)", info.study_id, info.version,
                 ", ".join(r.stage for r in refs))
        if state.requeue is not None:
            try:
                for r in refs:
                    state.requeue(r.version_id, r.stage)
                queued = True
            except Exception as exc:  # a broker hiccup: the steps are pending in the index, reconcile finds them
                log.warning("study %d version %d: retried steps not queued now (%s); the reconcile pass will",
                            info.study_id, info.version, type(exc).__name__)
    if state.nudge is not None:
        state.nudge()
    return [r.stage for r in refs], queued


def retry_delivery(state: WebState, delivery_id: int) -> dict[str, Any]:
    """A parked delivery back to pending, due now; NotFound for an unknown id, Conflict when it is not parked."""
    with state.index.engine.connect() as c:
        row = c.execute(select(Delivery.state, Delivery.version_id).where(Delivery.id == delivery_id)).first()
    if row is None:
        raise NotFound(f"no delivery {delivery_id}")
    n = Outbox(state.index, state.settings).retry([delivery_id])
    if n == 0:
        raise Conflict(f"delivery {delivery_id} is {row[0]}, not parked: nothing to retry")
    if state.nudge is not None:
        state.nudge()
    return {"delivery_id": delivery_id, "version_id": row[1], "state": "pending"}


def router(state: WebState) -> APIRouter:
    r = APIRouter(prefix="/api", tags=["api"])

    @r.get("/status", summary="Studies, versions, pipeline steps, reports and deliveries (dicomnode.status/1)")
    def status() -> JSONResponse:
        return JSONResponse(full_status(state.index, state.settings))

    @r.get("/versions/{version_id}", summary="One study version of the status document")
    def version(version_id: int) -> JSONResponse:
        found = find_version(full_status(state.index, state.settings), version_id)
        if found is None:
            raise HTTPException(404, f"no study version {version_id}")
        st, v = found
        return JSONResponse({"study_id": st["id"], "study_instance_uid": st["study_instance_uid"], **v})

    @r.get("/events", summary="The event log, newest `limit` matching events, oldest first")
    def get_events(
        study: int | None = Query(None, description="a study's index id"),
        kind: str | None = Query(None, description="an event kind, or several separated by commas"),
        since: str | None = Query(None, description="UNIX seconds or ISO-8601 (UTC when no zone is given)"),
        limit: int = Query(200, ge=1, le=MAX_EVENTS),
    ) -> JSONResponse:
        try:
            t = parse_since(since)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        kinds = [k.strip() for k in kind.split(",") if k.strip()] if kind else None
        return JSONResponse(events(state, study=study, kinds=kinds, since=t, limit=limit))

    @r.post("/versions/{version_id}/retry", summary="The version's failed pipeline steps back to pending")
    def post_retry_version(version_id: int) -> JSONResponse:
        try:
            stages, queued = retry_version(state, version_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return JSONResponse({"version_id": version_id, "retried": stages, "queued": queued})

    @r.post("/deliveries/{delivery_id}/retry", summary="A parked delivery back to pending, due now")
    def post_retry_delivery(delivery_id: int) -> JSONResponse:
        try:
            return JSONResponse(retry_delivery(state, delivery_id))
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None

    return r
