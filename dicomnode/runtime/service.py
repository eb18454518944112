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

from celery import Celery

from dicomnode.config import Settings
from dicomnode.index.studies import Index
from dicomnode.index.jobs import Jobs
from dicomnode.runtime.app import EmbeddedWorker, make_app, send_step, set_runner_factory
from dicomnode.runtime.runner import Runtime
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

    def install_runner(self, queues: Sequence[str]) -> None:
        """How this process runs steps (embedded mode shares the node's Index); the stages are warmed at once,
        in the background, so the first study does not pay for imports and checkpoint validation."""
        self.runtime = Runtime(self.settings, self.index, send=self.send, after_dispatch=self.after_dispatch)
        self.runtime.warm_in_background(queues)
        set_runner_factory(lambda: self.runtime)

    def start(self, queues: Sequence[str]) -> None:
        if queues:
            self.install_runner(queues)
            self.worker = EmbeddedWorker(self.app, queues, concurrency=self.settings.worker_concurrency)
            self.worker.start()
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
    requeues on worker loss only with it. Each child builds its own Runtime
    (index connection, model cache) lazily after the fork, so the parent never
    initialises CUDA.
    """
    if settings.embedded:
        raise ValueError("dicomnode worker needs broker_url (redis://...): embedded mode has no shared queue")
    app = make_app(settings)

    def factory() -> Runtime:
        index = Index(settings.index_url)
        rt = Runtime(settings, index, send=make_sender(app, index))
        rt.warm(queues)  # in the child, after the fork: CUDA and checkpoints are initialised there, never in the parent
        return rt

    set_runner_factory(factory)
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency or settings.worker_concurrency),
            "--pool", pool, "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", settings.log_level, "--hostname", f"{'-'.join(queues)}-%h-{int(time.time())}"]
    app.worker_main(argv=argv)
