"""Liveness and readiness: ``GET /healthz`` and ``GET /readyz`` (docs/operations.md).

Two questions, kept apart because a supervisor acts differently on each:
``/healthz`` answers "is this process alive?" (a restart cures a no) and so
does no I/O at all, or a slow database would get a healthy node restarted;
``/readyz`` answers "should a PACS (or a load balancer) send to this node
now?", checking each thing a received study needs, and names the one that
failed so an operator knows where to look without reading logs.

The same checks feed ``dicomnode_ready_check`` in ``/metrics``
(:mod:`dicomnode.web.metrics`), since Prometheus alerts on figures, not on
JSON documents.
"""
from __future__ import annotations

import logging
import shutil
import socket
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kombu import Connection
from sqlalchemy import text

from dicomnode.web.state import WebState

log = logging.getLogger(__name__)

# Bounds of the probes that touch the network: a readiness probe that hangs is worse than one that says no.
CONNECT_TIMEOUT_S = 1.0
BROKER_TIMEOUT_S = 2.0
# A listener bound to every address is reached on loopback from the same host.
_ANY_ADDRESS = {"", "0.0.0.0", "::"}


@dataclass(frozen=True)
class Check:
    """One readiness check: whether it passed and, either way, one line an operator can act on."""

    ok: bool
    detail: str


def check_index(state: WebState) -> Check:
    try:
        with state.index.engine.connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means the same to a probe: not ready
        return Check(False, f"index unreachable: {type(exc).__name__}")
    return Check(True, "index answers")


def check_listener(state: WebState) -> Check:
    """In-process: the node's own listener; in ``dicomnode web`` (no listener here): a TCP connect to its port.

    The in-process case does not connect, so a probe every few seconds adds no
    connections (and no log lines) to the listener it is checking.
    """
    s = state.settings
    if state.listener is not None:
        server = getattr(state.listener, "server", None)
        if server is None:
            return Check(False, "the DICOM listener is not running")
        return Check(True, f"listening as {s.ae_title} on port {state.listener.port}")
    host = "127.0.0.1" if s.host in _ANY_ADDRESS else s.host
    try:
        with socket.create_connection((host, s.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        return Check(False, f"nothing accepts connections on {host}:{s.port} "
                            f"({exc.strerror or type(exc).__name__})")
    return Check(True, f"{host}:{s.port} accepts connections")


def check_pipeline(state: WebState) -> Check | None:
    """The back half (assembler, pipeline, dispatcher) of the serve process; None where it does not run here."""
    if state.ready is None:
        return None
    try:
        running = bool(state.ready())
    except Exception as exc:
        return Check(False, f"could not ask the node: {type(exc).__name__}")
    return Check(True, "assembler, pipeline and dispatcher running") if running else \
        Check(False, "the node's back half (assembler, pipeline, dispatcher) is not running yet")


def check_disk(state: WebState) -> Check:
    """Free space of data_dir against ``min_free_disk_mb``, under which the listener refuses every C-STORE."""
    s = state.settings
    try:
        free = shutil.disk_usage(s.data_path).free
    except OSError as exc:
        return Check(False, f"cannot read free space of data_dir: {exc.strerror or type(exc).__name__}")
    free_mb = free // (1024 * 1024)
    if free < s.min_free_disk_mb * 1024 * 1024:
        return Check(False, f"{free_mb} MiB free in data_dir, under min_free_disk_mb={s.min_free_disk_mb}: "
                            f"C-STOREs are refused (0xA700)")
    return Check(True, f"{free_mb} MiB free (min_free_disk_mb={s.min_free_disk_mb})")


def check_broker(state: WebState) -> Check | None:
    """The Celery broker in distributed mode; None in embedded mode (no broker).

    The detail never carries the broker URL: it may hold a password.
    """
    url = state.settings.broker_url
    if not url:
        return None
    try:
        with Connection(url, connect_timeout=BROKER_TIMEOUT_S,
                        transport_options={"socket_connect_timeout": BROKER_TIMEOUT_S,
                                           "socket_timeout": BROKER_TIMEOUT_S}) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:
        return Check(False, f"broker unreachable: {type(exc).__name__}: {str(exc)[:160]}")
    return Check(True, "broker answers")


def readiness(state: WebState) -> dict[str, Check]:
    """Every check that applies to this process, by name (index, listener, pipeline, disk, broker)."""
    found = {
        "index": check_index(state),
        "listener": check_listener(state),
        "pipeline": check_pipeline(state),
        "disk": check_disk(state),
        "broker": check_broker(state),
    }
    return {name: c for name, c in found.items() if c is not None}


def router(state: WebState) -> APIRouter:
    """``/healthz`` and ``/readyz`` for the app in :mod:`dicomnode.web.app`."""
    r = APIRouter()

    @r.get("/healthz")
    def healthz() -> dict[str, str]:
        # no I/O on purpose: alive is all this says
        return {"status": "alive"}

    @r.get("/readyz")
    def readyz() -> JSONResponse:
        checks = readiness(state)
        ready = all(c.ok for c in checks.values())
        if not ready:
            log.debug("not ready: %s", "; ".join(f"{n}: {c.detail}" for n, c in checks.items() if not c.ok))
        return JSONResponse({"ready": ready, "checks": {n: {"ok": c.ok, "detail": c.detail}
                                                         for n, c in checks.items()}},
                            status_code=200 if ready else 503)

    return r
