"""The node process: index, spool, assembler and listener wired together from one settings object."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from .assemble import Assembler
from .config import Settings
from .index import Index
from .receive import StorageSCP
from .spool import Spool

log = logging.getLogger(__name__)


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_path.mkdir(parents=True, exist_ok=True)
        self.index = Index(settings.index_url)
        self.spool = Spool(settings.data_path, fsync=settings.fsync)
        self.assembler = Assembler(settings, self.index, self.spool)
        self.scp = StorageSCP(settings, self.index, self.spool, on_release=self.assembler.nudge)
        self._stopped = threading.Event()

    def start(self) -> None:
        """Recover the spool, resume assembly from the index, then open the port (in that order)."""
        self.spool.recover(self.index.known_paths())
        self.assembler.start()
        self.scp.start()
        self.index.add_event("node_started", f"listening as {self.settings.ae_title} on port {self.scp.port}")

    def stop(self) -> None:
        self.scp.stop()
        self.assembler.stop()
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
