"""The dispatch daemon: a thread that pumps the outbox every ``poll_s`` and when nudged.

Deliberately dumb: all state lives in the outbox rows, so the thread can die
with the process and a new one (here or on another host) picks up exactly
where it stopped. The only thing it must never do is stop pumping because one
pump failed (a database hiccup, a bug in one peer's handling): it logs and
tries again on the next tick.
"""
from __future__ import annotations

import logging
import threading

from dicomnode.stages.dispatch import Outbox, PumpResult

log = logging.getLogger(__name__)


class Dispatcher:
    """Runs ``outbox.pump()`` in a daemon thread; ``nudge()`` asks for a pump now."""

    def __init__(self, outbox: Outbox, poll_s: float) -> None:
        self.outbox = outbox
        self.poll_s = poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pumps = 0  # completed pumps, failed ones included: for status pages and tests
        self.failures = 0
        self.last_result: PumpResult | None = None
        self.last_error: str | None = None

    def start(self) -> Dispatcher:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicomnode-dispatch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop after the pump in progress (if any); rows it did not finish stay claimed until their lease ends."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def nudge(self) -> None:
        """Pump as soon as possible, e.g. right after a report was enqueued, instead of waiting for the tick."""
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        streak = 0
        while not self._stop.is_set():
            try:
                self.last_result = self.outbox.pump()
                if streak:
                    log.info("dispatch pump works again after %d failure(s)", streak)
                streak = 0
                self.last_error = None
            except Exception as exc:  # never let one bad pump end dispatch
                streak += 1
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if streak == 1:
                    log.exception("dispatch pump failed; retrying every %.1fs", self.poll_s)
                else:
                    log.warning("dispatch pump failed again (%d in a row): %s", streak, type(exc).__name__)
            self.pumps += 1
            self._wake.wait(self.poll_s)
            self._wake.clear()
