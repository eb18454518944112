"""The pipeline as one process sees it: the Celery app, the workers it runs, and reconciliation.

The serve process owns reconciliation (start-up and periodic) and, in
embedded mode, a worker thread; ``dicomnode worker`` processes own only
workers. Everything goes through ``send`` so that every queued message is
also recorded (``sent_at``) in the index.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from dicomnode.config import Settings
from dicomnode.index.studies import Index
from dicomnode.index.jobs import Jobs
from dicomnode.runtime.app import EmbeddedWorker, get_runner, make_app, send_step, set_runner_factory
from dicomnode.runtime.runner import Runtime, threads_per_slot
from dicomnode.stages import STAGE_NAMES as STAGES

log = logging.getLogger(__name__)


def make_sender(app: Celery, index: Index) -> Callable[[int, str], None]:
    """Queue a step, recording when (``sent_at``) so reconcile can tell a lost message from a queued one."""
    jobs = Jobs(index)

    def send(version_id: int, stage: str) -> None:
        jobs.mark_sent(version_id, stage)
        send_step(app, version_id, stage)

    return send


class Pipeline:
    def __init__(self, settings: Settings, index: Index, *, after_dispatch: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.index = index
        self.jobs = Jobs(index)
        self.app: Celery = make_app(settings)
        self.after_dispatch = after_dispatch
        self.worker: EmbeddedWorker | None = None
        self.send = make_sender(self.app, index)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- queueing ---------------------------------------------------------------------------

    def start_version(self, version_id: int, study_id: int) -> None:
        """A version completed: its first step exists from now on, whatever happens to the message."""
        self.jobs.create(version_id, study_id, STAGES[0])
        self.send(version_id, STAGES[0])

    def reconcile(self, *, startup: bool = False) -> int:
        """Queue again whatever the index says is unfinished; returns how many messages were sent."""
        n = 0
        for info in self.index.completed_versions():
            if self.jobs.create(info.version_id, info.study_id, STAGES[0]):
                log.info("study %d version %d: complete but never queued; queued now", info.study_id, info.version)
        resend_after = None if startup else self.settings.broker_visibility_timeout_s
        for ref in self.jobs.unfinished(pending_resend_after_s=resend_after):
            self.send(ref.version_id, ref.stage)
            n += 1
        if n:
            log.info("reconcile: %d unfinished step(s) queued again", n)
        return n

    # -- running ----------------------------------------------------------------------------

    def install_runner(self) -> Runtime:
        """How this process runs steps (embedded mode shares the node's Index and its connection pool)."""
        threads = threads_per_slot(self.settings.torch_threads, self.settings.worker_concurrency)
        self.runtime = Runtime(self.settings, self.index, send=self.send, after_dispatch=self.after_dispatch,
                               threads=threads)
        set_runner_factory(lambda: self.runtime)
        return self.runtime

    def start(self, queues: Sequence[str]) -> None:
        """Start this process's worker (if it consumes queues), warm its stages, reconcile: after the port opened.

        The worker first, so that what reconcile queues on the embedded
        transport finds a consumer; the stages' warm-up (torch's import,
        checkpoint validation) then runs in a thread of its own, so the first
        study does not pay for it and nothing waits for it.
        """
        if queues:
            runtime = self.install_runner()
            self.worker = EmbeddedWorker(self.app, queues, concurrency=self.settings.worker_concurrency)
            self.worker.start()
            runtime.warm_in_background(queues)
            log.info("in-process worker consuming %s (%s)", ",".join(queues),
                     "embedded transport" if self.settings.embedded else "broker")
        self.reconcile(startup=True)
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_s):
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile pass failed; retrying")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.worker:
            self.worker.stop()


def run_worker(settings: Settings, queues: Sequence[str], *, concurrency: int | None = None,
               pool: str = "prefork") -> None:
    """``dicomnode worker``: a Celery worker process for the given queues (distributed mode).

    Prefork by default: Celery enforces the soft and hard time limits and
    requeues on worker loss only with it. Each process that runs tasks (each
    prefork child, after its fork; the worker itself with ``solo``/``threads``)
    builds its own Runtime (index connection, model cache) and warms its
    stages in a background thread as soon as it starts, so the parent never
    initialises CUDA and the first study does not pay for torch's import and
    checkpoint validation. A thread, not the init itself: Celery gives a child
    ``worker_proc_alive_timeout`` (4 s) to report that it is up.

    torch's pools get this process's share of the cores (``torch_threads``,
    auto = usable cores // task slots), applied in that same start-up.
    """
    if settings.embedded:
        raise ValueError("dicomnode worker needs broker_url (redis://...): embedded mode has no shared queue")
    app = make_app(settings)
    slots = concurrency or settings.worker_concurrency
    threads = threads_per_slot(settings.torch_threads, slots)

    def factory() -> Runtime:
        index = Index(settings.index_url)
        return Runtime(settings, index, send=make_sender(app, index), threads=threads)

    def build_and_warm() -> None:
        try:
            runtime = get_runner()
            if isinstance(runtime, Runtime):
                runtime.warm(queues)
        except Exception:
            log.exception("preparing this worker process failed (its first step will try again)")

    def start_process(**_: Any) -> None:
        threading.Thread(target=build_and_warm, name="warm-stages", daemon=True).start()

    set_runner_factory(factory)
    if pool == "prefork":
        worker_process_init.connect(start_process, weak=False)
    else:
        start_process()
    log.info("worker for %s: %d task slot(s), %d torch thread(s) each", ",".join(queues), slots, threads)
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(slots),
            "--pool", pool, "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", settings.log_level, "--hostname", f"{'-'.join(queues)}-%h-{int(time.time())}"]
    app.worker_main(argv=argv)
