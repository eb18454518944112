"""The node process: index, spool, assembler and listener wired together from one settings object."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicomnode.assemble.completion import Assembler
from dicomnode.config import Settings
from dicomnode.runtime.dispatcher import Dispatcher
from dicomnode.stages.dispatch import Outbox
from dicomnode.index.studies import DueVersion, Index
from dicomnode.runtime.service import Pipeline
from dicomnode.dicom.scp import StorageSCP
from dicomnode.spool import Spool

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
        self.scp = StorageSCP(settings, self.index, self.spool, on_release=self.assembler.nudge)
        self._stopped = threading.Event()

    def _on_complete(self, due: DueVersion) -> None:
        self.pipeline.start_version(due.version_id, due.study_id)

    def start(self) -> None:
        """Recover the spool, resume the pipeline and assembly from the index, then open the port (in that order)."""
        self.spool.recover(self.index.known_paths())
        self.pipeline.start(self.settings.serve_queues)
        self.dispatcher.start()
        self.assembler.start()
        self.scp.start()
        self.index.add_event("node_started", f"listening as {self.settings.ae_title} on port {self.scp.port}")

    def stop(self) -> None:
        self.scp.stop()
        self.assembler.stop()
        self.pipeline.stop()
        self.dispatcher.stop()
        self.index.add_event("node_stopped", "clean shutdown")
        self.index.close()
        self._stopped.set()

    def serve_forever(self) -> None:
        def _handle(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: shutting down", signum)
            self._stopped.set()

        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)
        self.start()
        self._stopped.wait()
        self._stopped.clear()
        self.stop()
