"""The node process: index, spool, listener, assembler, pipeline and dispatcher wired together from one settings object.

Start-up order, and why the port opens where it does (:meth:`Node.start`):

1. ``Node()``: the index is opened and its schema brought to head (a C-STORE
   commits a row before Success, so the schema must be right before the port
   opens; a bad database stops the node here, with its reason), and every part
   is built; building is cheap, nothing runs yet.
2. Spool recovery, then the port opens. Recovery cannot run while receiving:
   it deletes ``spool/tmp``, where arriving datasets are streamed, and moves
   stored files without an index row aside, which would race an instance that
   is renamed but not yet committed.
3. Then, in a background thread (``start-back``): the pipeline (in embedded
   mode Celery's worker machinery and, behind it, the stages' warm-up that
   imports torch and validates checkpoints; then the start-up reconcile), the
   dispatcher and the assembler. All of them are safe to start after the port
   opened because their work is read from the index, never handed over in
   memory: an instance received before the assembler runs is a row its first
   pass finds; a version that completes is a job row reconcile would queue even
   if its message were lost; a report waits in the outbox. The assembler starts
   last, so that what it completes finds a pipeline ready to take it.

The result: the listener answers after the imports the edge needs (pydicom,
pynetdicom, SQLAlchemy) and the index check, and never waits for torch.

The HTTP side (``http_port``; 0 turns it off) takes its socket at the end of
``Node()``, before the DICOM port opens, so a busy ``http_port``, unreadable
TLS files or a node facing the network without credentials stop start-up
with one line (``dicomnode serve`` exits 2) rather than leaving a node whose
dashboard never came up. It serves from its own thread from :meth:`Node.start`
on, reading the same index, and is stopped first by :meth:`Node.stop`, so no
operator action arrives while the rest shuts down.
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicomnode.assemble.completion import Assembler
from dicomnode.config import Settings
from dicomnode.dicom.scp import StorageSCP
from dicomnode.index.studies import DueVersion, Index
from dicomnode.runtime.dispatcher import Dispatcher
from dicomnode.runtime.retention import RetentionLoop
from dicomnode.runtime.service import Pipeline
from dicomnode.spool import Spool
from dicomnode.stages.dispatch import Outbox
from dicomnode.web.server import WebServer

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_path.mkdir(parents=True, exist_ok=True)
        self.index = Index(settings.index_url)
        self.spool = Spool(settings.data_path, fsync=settings.fsync)
        self.outbox = Outbox(self.index, settings)
        self.dispatcher = Dispatcher(self.outbox, settings.dispatch_poll_s)
        self.pipeline = Pipeline(settings, self.index, after_dispatch=self.dispatcher.nudge)
        self.assembler = Assembler(settings, self.index, self.spool, on_complete=self._on_complete)
        self.retention = RetentionLoop(settings, self.index)  # docs/retention.md: delivered versions' files only
        self.scp = StorageSCP(settings, self.index, self.spool, on_release=self.assembler.nudge)
        self.ready = threading.Event()  # set once the back half (pipeline, dispatcher, assembler) runs
        self.failure: str | None = None  # why the back half could not start (the node then stops)
        self._stopped = threading.Event()
        self._back: threading.Thread | None = None
        self.web: WebServer | None = None
        if settings.http_port:
            try:
                # an operator retry from the dashboard: the step is queued at once (pipeline.send) and the
                # dispatcher pumps at once (a re-queued delivery), instead of at their next periodic pass
                self.web = WebServer(settings, index=self.index, listener=self.scp, ready=self.ready.is_set,
                                     nudge=self.dispatcher.nudge, requeue=self.pipeline.send)
                self.web.bind()
            except BaseException:
                self.index.close()
                raise

    def _on_complete(self, due: DueVersion) -> None:
        self.pipeline.start_version(due.version_id, due.study_id)

    def start(self) -> None:
        """Recover the spool, open the port, then start the rest in the background (see the module docstring).

        Returns once the port is open; :meth:`wait_ready` waits for the rest.
        """
        self.spool.recover(self.index.known_paths())
        if self.web is not None:
            self.web.start()
        self.scp.start()
        self._back = threading.Thread(target=self._start_back, name="start-back", daemon=True)
        self._back.start()

    def _start_back(self) -> None:
        try:
            self.index.add_event("node_started", f"listening as {self.settings.ae_title} on port {self.scp.port}")
            self.pipeline.start(self.settings.serve_queues)
            self.dispatcher.start()
            self.retention.start()
            self.assembler.start()
        except Exception as exc:  # a node that cannot process what it receives must not pretend to be up
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("the pipeline, dispatcher or assembler could not start: stopping the node")
            self._stopped.set()
            return
        self.ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the pipeline, dispatcher and assembler run (False on timeout or if they could not start)."""
        if self._back is not None:
            self._back.join(timeout)
        return self.ready.is_set()

    def stop(self) -> None:
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        if self._back is not None:
            self._back.join(timeout=60)  # a start in progress finishes first, so that everything it began is stopped
        self.assembler.stop()
        self.retention.stop()
        self.pipeline.stop()
        self.dispatcher.stop()
        self.index.add_event("node_stopped", "clean shutdown" if self.failure is None else
                             f"stopped: the back half could not start ({self.failure})")
        self.index.close()
        self._stopped.set()

    def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT; the exit status: 0 after a clean stop, 1 if the back half could not start."""
        def _handle(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: shutting down", signum)
            self._stopped.set()

        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)
        self.start()
        self._stopped.wait()
        self._stopped.clear()
        self.stop()
        return 0 if self.failure is None else 1
