"""The Celery application: queues, reliability settings, the one task, and the workers that run it.

Why one task (``dicomnode.step``) with a stage argument rather than a task per
stage: the index row is the unit of work (see ``jobs.py``), the message only
points at it, and routing is by queue (``cpu`` or ``gpu``) chosen when the
message is sent. A GPU host consumes only ``gpu`` and so only ever runs infer.

Embedded mode (no ``broker_url``) uses kombu's in-process ``memory://``
transport and a real ``WorkController`` in a thread of the serve process: the
same serialisation, routing and acknowledgement path as with Redis, not eager
mode. Its queue is lost with the process, which is why start-up reconciles
from the index.
"""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from celery.worker import WorkController
from kombu import Queue

from dicomnode.config import Settings
from dicomnode.stages import QUEUE_OF, QUEUES

log = logging.getLogger(__name__)

STEP_TASK = "dicomnode.step"

# The process-wide step runner the task calls; set by whoever starts a worker
# (the serve process for embedded mode, ``dicomnode worker`` otherwise).
_runner: Callable[[int, str], None] | None = None
_runner_factory: Callable[[], Callable[[int, str], None]] | None = None
_runner_lock = threading.Lock()


def set_runner_factory(factory: Callable[[], Callable[[int, str], None]]) -> None:
    """Install how a worker process builds its step runner (lazily: after a prefork child is forked)."""
    global _runner_factory, _runner
    with _runner_lock:
        _runner_factory, _runner = factory, None


def get_runner() -> Callable[[int, str], None]:
    """This process's step runner, built by the installed factory on first use (once, under a lock)."""
    global _runner
    with _runner_lock:
        if _runner is None:
            if _runner_factory is None:
                raise RuntimeError("no step runner installed in this worker process")
            _runner = _runner_factory()
        return _runner


def make_app(settings: Settings) -> Celery:
    broker = settings.broker_url or "memory://localhost/"
    app = Celery("dicomnode", broker=broker, set_as_current=False)
    transport_options: dict[str, Any] = {"visibility_timeout": settings.broker_visibility_timeout_s}
    if broker.startswith("memory://"):
        transport_options["polling_interval"] = 0.05
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_hard_time_limit_s,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_default_queue="cpu",
        task_queues=[Queue(q) for q in QUEUES],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        task_default_delivery_mode="persistent",
    )

    @app.task(name=STEP_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def step(version_id: int, stage: str) -> None:
        # Exceptions are recorded in the index by the runner; a task that
        # raises is still acknowledged, so the runner never relies on Celery
        # retries: the index row and reconcile are the retry mechanism.
        get_runner()(int(version_id), str(stage))

    return app


def send_step(app: Celery, version_id: int, stage: str) -> None:
    app.send_task(STEP_TASK, args=[version_id, stage], queue=QUEUE_OF[stage])


class _ReadyController(WorkController):  # type: ignore[misc]
    """A WorkController that says when its consumer is ready (Celery has no public hook for that in a thread)."""

    def __init__(self, *args: Any, ready: threading.Event, **kwargs: Any) -> None:
        self.ready_event = ready
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        super().on_consumer_ready(consumer)
        self.ready_event.set()


class EmbeddedWorker:
    """A real Celery worker in a thread of the current process (embedded mode, tests).

    Thread pool: the serve process also runs the DICOM listener, so forking it
    (prefork) is not an option; time limits are therefore not enforced here
    (Celery enforces them only in prefork). Stop is cooperative: a running step
    finishes first.

    Constructing and starting it is Celery's worker machinery at work
    (bootsteps, consumer, pool, which Celery imports and builds then: about
    0.2 s of CPU on a two-core host): the node does it after its port is open
    (``Node.start``), never on the listener's path.
    """

    def __init__(self, app: Celery, queues: Sequence[str], concurrency: int = 1, name: str = "embedded") -> None:
        self._ready = threading.Event()
        self.controller = _ReadyController(
            app=app, hostname=f"{name}@{socket.gethostname()}", pool="threads", concurrency=concurrency,
            queues=list(queues), without_heartbeat=True, without_mingle=True, without_gossip=True,
            loglevel="WARNING", ready_callback=None, ready=self._ready,
        )
        self._thread = threading.Thread(target=self._run, name="celery-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.controller.start()
        except Exception:
            log.exception("embedded worker stopped with an error")

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the embedded Celery worker did not start")

    def stop(self, timeout: float = 60.0) -> None:
        try:
            self.controller.stop(in_sighandler=False, exitcode=0)
        except Exception:
            log.exception("stopping the embedded worker")
        self._thread.join(timeout)
