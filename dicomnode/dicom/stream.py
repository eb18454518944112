"""The streamed data set of a C-STORE, from its first fragment to the handler: space, failures, and clean-up.

pynetdicom streams each received data set into a temporary file as its PDUs
arrive (``STORE_RECV_CHUNKED_DATASET``) and hands the path to the C-STORE
handler once the last fragment is in. Three things can go wrong between
those two moments that pynetdicom, left alone, answers with silence:

- the disk fills while the data set streams in (ENOSPC in the DUL thread:
  the association is aborted, no status, and the partial file stays);
- the peer stops sending, aborts or drops the connection mid-data-set (the
  file stays in ``spool/tmp`` until the next start-up);
- the command set carries a UID pynetdicom refuses to turn into a request
  (longer than 64 characters: pynetdicom logs it and gives no answer).

A :class:`ReceiveGuard`, attached by the listener to each association before
it is accepted, keeps the state that lets every one of these end in a status
(0xA700 for space, 0xC212 for the command set) and no file left behind: the
streams still open, and the ones that could not be written. The listener's
handler claims a stream when it starts (from then on the handler's ``finally``
removes it); whatever is still open when the association ends is removed by
:meth:`ReceiveGuard.close_all`.
"""
from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# How often a stream re-checks the free space while it grows: a 512 MiB instance
# checks 8 times (a statvfs is microseconds), a 512 KiB image only at its start.
RECHECK_EVERY_BYTES = 64 * 1024 * 1024


class Sink:
    """Where the rest of a data set goes once it cannot be stored: nowhere.

    It keeps the shape pynetdicom expects of the temporary file it writes
    fragments into (``write``, ``file.flush``, ``close``, ``name``), so the
    association reads the data set to its end and the handler can still
    answer with a status instead of the association being aborted.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.file = self

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class Stream:
    """One data set being received: its file, the bytes written since the last space check."""

    path: Path
    file: Any  # the NamedTemporaryFile, or a Sink once writing stopped
    since_check: int = 0


@dataclass
class ReceiveGuard:
    """Per-association receive state; the listener creates one in its ``EVT_REQUESTED`` handler."""

    min_free_bytes: int
    free_bytes: Callable[[], int]
    # status, PHI-free reason: the listener records an event and a WARNING line
    refused: Callable[[int, str], None]
    tmp_dir: Path | None = None  # where data sets stream to (the spool's tmp); None: the process's temp folder
    streams: dict[Path, Stream] = field(default_factory=dict)
    failed: dict[Path, str] = field(default_factory=dict)  # path -> why it could not be written
    lock: threading.Lock = field(default_factory=threading.Lock)

    def space_ok(self) -> bool:
        try:
            return self.free_bytes() >= self.min_free_bytes
        except OSError:  # cannot even ask: the handler's own check answers
            return True

    def opened(self, path: Path, file: Any) -> Any:
        """Register a new stream; returns the file to write into (a :class:`Sink` when there is no room)."""
        stream = Stream(path, file)
        with self.lock:
            self.streams[path] = stream
        if not self.space_ok():
            self._stop(stream, f"free disk under min_free_disk_mb={self.min_free_bytes // 2**20}")
        return stream.file

    def write(self, path: Path, data: bytes) -> None:
        """Write one fragment; a full disk turns the stream into a sink, never an exception in the DUL thread."""
        with self.lock:
            stream = self.streams.get(path)
        if stream is None:  # not ours (no guard when the stream opened): write as upstream
            return
        if isinstance(stream.file, Sink):
            return
        try:
            stream.file.write(data)
            stream.file.file.flush()
        except OSError as exc:
            why = "node disk full while receiving" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else \
                f"node cannot write its spool ({exc.strerror or type(exc).__name__})"
            self._stop(stream, why)
            return
        stream.since_check += len(data)
        if stream.since_check >= RECHECK_EVERY_BYTES:
            stream.since_check = 0
            if not self.space_ok():
                self._stop(stream, f"free disk under min_free_disk_mb={self.min_free_bytes // 2**20} while receiving")

    def _stop(self, stream: Stream, why: str) -> None:
        """Stop writing: close and remove what was written, keep reading the rest of the data set into a sink."""
        _close_and_remove(stream.file, stream.path)
        stream.file = Sink(str(stream.path))
        with self.lock:
            self.failed[stream.path] = why
        log.debug("stream %s stopped: %s", stream.path.name, why)

    def mark_failed(self, path: Path, why: str) -> None:
        with self.lock:
            self.failed[path] = why

    def file_of(self, path: Path) -> Any:
        with self.lock:
            stream = self.streams.get(path)
        return None if stream is None else stream.file

    def claim(self, path: Path) -> str | None:
        """The handler takes the stream over (it removes the file itself); returns why it failed, if it did."""
        with self.lock:
            self.streams.pop(path, None)
            return self.failed.pop(path, None)

    def forget(self, path: Path) -> None:
        """A stream that ended without reaching a handler (an invalid command set): close and remove it."""
        with self.lock:
            stream = self.streams.pop(path, None)
            self.failed.pop(path, None)
        if stream is not None:
            _close_and_remove(stream.file, path)

    def close_all(self) -> int:
        """At the end of the association: remove every stream no handler claimed. Returns how many."""
        with self.lock:
            streams = list(self.streams.values())
            self.streams.clear()
            self.failed.clear()
        for s in streams:
            _close_and_remove(s.file, s.path)
        return len(streams)


def _close_and_remove(file: BinaryIO | Sink | Any, path: Path) -> None:
    try:
        file.close()
    except OSError:  # a full disk can fail the close's flush too; the file goes either way
        pass
    path.unlink(missing_ok=True)


def attach(assoc: Any, guard: ReceiveGuard) -> None:
    assoc.receive_guard = guard


def guard_of(assoc: Any) -> ReceiveGuard | None:
    return getattr(assoc, "receive_guard", None)
