"""``GET /metrics``: the node's figures in Prometheus text format, read from the index at scrape time.

Why from the index and not from counters kept in memory: the index is the
authority on every instance, step and delivery, so the figures survive a
restart (a counter in memory would start again from 0 and hide what came
before), and ``dicomnode web`` (a separate process in distributed mode, with
no listener or worker in it) serves the same figures as ``dicomnode serve``.
Prometheus takes a counter that goes down (a retry clears a failed step, a
step's duration is overwritten when it runs again) as a reset, which is the
right reading.

A scrape is a handful of aggregate queries (``COUNT``/``SUM``/``GROUP BY``),
never a loop over instance rows, so its cost does not grow with the studies
held beyond what the database's own aggregation costs.

A dedicated :class:`CollectorRegistry` per app, not prometheus_client's
global one: two apps in one process (tests, or serve plus a second index)
must not share or collide on metric names.
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from dicomnode.index.jobs import DONE, FAILED, PENDING, RUNNING
from dicomnode.index.schema import EventRow, Instance, Job, StudyVersion
from dicomnode.stages import QUEUE_OF, QUEUES, STAGE_NAMES
from dicomnode.stages.context import package_version
from dicomnode.stages.dispatch import CONFIRMATIONS, STATES, Outbox
from dicomnode.web.health import readiness
from dicomnode.web.state import WebState

log = logging.getLogger(__name__)

# Step durations from 0.1 s (a report, a dispatch) to 20 min (the hard time limit's order): upper bounds in seconds.
DURATION_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
# The file names the checkpoint registry reads (models.registry.CHECKPOINT_SUFFIXES, not imported: models.registry
# imports torch, which the listener's and the web's processes must not load).
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt")
# scp.StorageSCP._refuse writes "C-STORE refused (0xA700): why; ..."; the status is read back from there.
_REFUSED_PREFIX = "C-STORE refused ("
_STATUS = re.compile(r"0x[0-9A-F]{4}")
# scp.StorageSCP._on_requested's three reasons to reject an association, as they start or end its message.
_REJECT_REASONS: tuple[tuple[str, str], ...] = (
    ("called AE %", "called_ae"),
    ("%is not in allowed_peers", "calling_ae"),
    ("%association slots%", "slots"),
)
_MIB = 1024 * 1024


class IndexCollector(Collector):
    """Every figure of one node, gathered afresh on each scrape."""

    def __init__(self, state: WebState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        # nothing: registering must not query the index (prometheus_client calls collect() when describe is absent)
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        s = self.state.settings
        info = GaugeMetricFamily("dicomnode_info", "This node's software version (the value is always 1).",
                                 labels=["version"])
        info.add_metric([package_version()], 1)
        yield info
        try:
            yield from self._from_index()  # all of them or none: a list, gathered before the first is yielded
        except Exception as exc:  # a scrape must still answer (dicomnode_ready_check says the index is down)
            log.warning("metrics: could not read the index (%s); index figures left out of this scrape",
                        type(exc).__name__)
        listener = self.state.listener
        if listener is not None:
            server = getattr(listener, "server", None)
            yield GaugeMetricFamily("dicomnode_associations_open",
                                    "Connections this process's DICOM listener serves now (associations, and "
                                    "peers still negotiating one).",
                                    value=len(server.active_associations) if server is not None else 0)
        free = GaugeMetricFamily("dicomnode_disk_free_bytes", "Free bytes on the file system of data_dir.")
        try:
            free.add_metric([], shutil.disk_usage(s.data_path).free)
            yield free
        except OSError:
            pass
        yield GaugeMetricFamily("dicomnode_disk_min_free_bytes",
                                "min_free_disk_mb in bytes: under this free space every C-STORE is refused (0xA700).",
                                value=s.min_free_disk_mb * _MIB)
        yield GaugeMetricFamily(
            "dicomnode_checkpoint_files",
            "Checkpoint files (.pt, .pth, .ckpt) in checkpoints_dir: counted, not validated (validation needs "
            "torch, which this process does not load); refused ones show as checkpoint_refused events.",
            value=_checkpoint_files(s.checkpoints_path))
        checks = readiness(self.state)
        ready = GaugeMetricFamily("dicomnode_ready", "1 when /readyz answers 200 (every check below passes).",
                                  value=int(all(c.ok for c in checks.values())))
        yield ready
        each = GaugeMetricFamily("dicomnode_ready_check", "Each /readyz check: 1 passed, 0 failed (see /readyz).",
                                 labels=["check"])
        for name, c in checks.items():
            each.add_metric([name], int(c.ok))
        yield each
        yield GaugeMetricFamily("dicomnode_metrics_collect_seconds", "Time this scrape took to gather its figures.",
                                value=time.perf_counter() - started)

    def _from_index(self) -> list[Metric]:
        state = self.state
        with state.index.engine.connect() as c:
            found = [*_instances(c), *_events(c), *_versions(c), *_jobs(c)]
        outbox = Outbox(state.index, state.settings)
        deliveries = GaugeMetricFamily("dicomnode_deliveries", "Report objects owed to destinations, by state "
                                       "(pending: to send or retry; sent; parked: gave up, `dicomnode retry "
                                       "--deliveries`).", labels=["state"])
        summary = outbox.summary()
        for st in STATES:
            deliveries.add_metric([st], summary.get(st, 0))
        confirmations = GaugeMetricFamily("dicomnode_deliveries_confirmation", "Sent report objects by how far "
                                          "the destination vouched for them (docs/dispatch.md).",
                                          labels=["confirmation"])
        conf = outbox.confirmations()
        for st in CONFIRMATIONS:
            confirmations.add_metric([st], conf.get(st, 0))
        return [*found, deliveries, confirmations]


def _instances(c: Connection) -> Iterator[Metric]:
    stored, repeats = c.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.duplicates), 0))).one()
    yield CounterMetricFamily("dicomnode_instances_received",
                              "C-STOREs answered Success with a stored instance or a repeat of one (duplicates "
                              "included).", value=int(stored) + int(repeats))
    yield CounterMetricFamily("dicomnode_instances_duplicate", "Repeats of a SOP instance already stored "
                              "(first copy kept, Success answered).", value=int(repeats))


def _events(c: Connection) -> Iterator[Metric]:
    kinds = dict(c.execute(select(EventRow.kind, func.count())
                           .where(EventRow.kind.in_(("association_aborted", "step_failed", "step_parked")))
                           .group_by(EventRow.kind)).all())
    status = func.substr(EventRow.message, len(_REFUSED_PREFIX) + 1, 6)
    refused = CounterMetricFamily("dicomnode_instances_refused", "C-STOREs refused, by the status answered "
                                  "(`dicomnode events` says why each).", labels=["status"])
    by_status: dict[str, int] = {}
    for code, n in c.execute(select(status, func.count()).where(EventRow.kind == "store_refused")
                             .group_by(status)).all():
        label = code if isinstance(code, str) and _STATUS.fullmatch(code) else "unknown"
        by_status[label] = by_status.get(label, 0) + int(n)
    for label, n in sorted(by_status.items()):
        refused.add_metric([label], n)
    yield refused
    reason = case(*((EventRow.message.like(pattern), name) for pattern, name in _REJECT_REASONS), else_="other")
    rejected = CounterMetricFamily("dicomnode_associations_rejected", "Associations rejected (A-ASSOCIATE-RJ), by "
                                   "reason: called_ae (not our AE title), calling_ae (not in allowed_peers), slots "
                                   "(max_associations or max_associations_per_peer).", labels=["reason"])
    for name, n in c.execute(select(reason, func.count()).where(EventRow.kind == "association_rejected")
                             .group_by(reason)).all():
        rejected.add_metric([str(name)], int(n))
    yield rejected
    yield CounterMetricFamily("dicomnode_associations_aborted", "Associations the listener aborted (stalled "
                              "peer, oversized PDU).", value=int(kinds.get("association_aborted", 0)))
    failures = CounterMetricFamily("dicomnode_step_failures", "Pipeline step failures (failed: the step raised; "
                                   "parked: its worker was lost max_deliveries times).", labels=["kind"])
    failures.add_metric(["failed"], int(kinds.get("step_failed", 0)))
    failures.add_metric(["parked"], int(kinds.get("step_parked", 0)))
    yield failures


def _versions(c: Connection) -> Iterator[Metric]:
    g = GaugeMetricFamily("dicomnode_study_versions", "Study versions by state.", labels=["state"])
    for st, n in c.execute(select(StudyVersion.state, func.count()).group_by(StudyVersion.state)).all():
        g.add_metric([str(st)], int(n))
    yield g


def _jobs(c: Connection) -> Iterator[Metric]:
    counts = {(stage, st): int(n) for stage, st, n in
              c.execute(select(Job.stage, Job.state, func.count()).group_by(Job.stage, Job.state)).all()}
    steps = GaugeMetricFamily("dicomnode_pipeline_steps", "Pipeline steps by stage and state (failed ones wait "
                              "for `dicomnode retry`).", labels=["stage", "state"])
    for stage in STAGE_NAMES:
        for st in (PENDING, RUNNING, DONE, FAILED):
            steps.add_metric([stage, st], counts.get((stage, st), 0))
    yield steps
    depth = GaugeMetricFamily("dicomnode_queue_depth", "Pipeline steps not yet finished (pending or running), by "
                              "the Celery queue that runs them.", labels=["queue"])
    per_queue = {q: 0 for q in QUEUES}
    for (stage, st), n in counts.items():
        if st in (PENDING, RUNNING) and stage in QUEUE_OF:
            per_queue[QUEUE_OF[stage]] += n
    for q, n in per_queue.items():
        depth.add_metric([q], n)
    yield depth
    hist = HistogramMetricFamily("dicomnode_stage_duration_seconds", "How long each finished pipeline step took, "
                                 "by stage and outcome (done or failed; the latest run of each step).",
                                 labels=["stage", "state"])
    seconds = Job.seconds
    columns = [func.sum(case((seconds <= b, 1), else_=0)) for b in DURATION_BUCKETS]
    rows = c.execute(select(Job.stage, Job.state, func.count(), func.sum(seconds), *columns)
                     .where(seconds.is_not(None), Job.state.in_((DONE, FAILED)))
                     .group_by(Job.stage, Job.state)).all()
    for stage, st, n, total, *cumulative in rows:
        buckets = [(_le(b), int(k or 0)) for b, k in zip(DURATION_BUCKETS, cumulative)] + [("+Inf", int(n))]
        hist.add_metric([str(stage), str(st)], buckets, float(total or 0.0))
    yield hist


def _le(bound: float) -> str:
    return repr(float(bound))


def _checkpoint_files(root: Path) -> int:
    try:
        return sum(1 for p in root.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    except OSError:
        return 0


def registry_for(state: WebState) -> CollectorRegistry:
    """A registry of its own holding this node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IndexCollector(state))
    return registry


def router(state: WebState) -> APIRouter:
    """``/metrics`` for the app in :mod:`dicomnode.web.app`."""
    r = APIRouter()
    registry = registry_for(state)

    @r.get("/metrics")
    def metrics() -> Response:
        # text format 0.0.4: what every Prometheus reads (Debian's 2.42 included); our names need no escaping
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return r
