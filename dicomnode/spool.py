"""The durable spool: received files under names the node makes up.

A received dataset lands first in ``spool/tmp`` (pynetdicom streams it there
while it arrives, so memory does not grow with instance size), is renamed
into ``spool/store/YYYYMMDD/<random>.dcm``, and both the file and its
directory are fsynced before the caller goes on. No part of any path ever
comes from a received value: a UID such as ``../../x`` cannot steer a write
(pynetdicom issue 823; dcmtk CVE-2022-2119).

Speed without weakening that: a device flush costs 3-4 ms on the shared test
host, and done one after the other (file, then directory) the two fsyncs were
two flushes per instance. Here the file is renamed first and the two fsyncs
run at the same time, the directory's in a helper thread, so the filesystem
commits both in one journal transaction (measured: 2.0 ms for both against
9.5 ms in sequence). The directory fsync is also shared (group commit): one
that starts after a caller's rename covers it, so concurrent associations
need one directory flush between them, not one each. :meth:`Spool.commit`
still returns only when both are durable.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)


class Spool:
    def __init__(self, data_dir: Path, fsync: bool = True) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "spool"
        self.tmp = self.root / "tmp"
        self.store = self.root / "store"
        self.orphans = self.root / "orphans"
        self.fsync = fsync
        for d in (self.tmp, self.store):
            d.mkdir(parents=True, exist_ok=True)
        self._dirs = DirectorySync()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def commit(self, tmp_path: Path) -> tuple[str, int]:
        """Make a fully received temporary file durable under a generated name.

        Returns the path relative to ``data_dir`` (what the index records) and
        the size. The caller removes the temporary file on any exception; a
        file renamed but not yet durable when the node dies is never indexed,
        so :meth:`recover` moves it aside.
        """
        day = self.store / time.strftime("%Y%m%d", time.gmtime())
        if not day.is_dir():
            day.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                _fsync_path(self.store)
        final = day / f"{uuid.uuid4().hex}.dcm"
        size = os.stat(tmp_path).st_size
        os.replace(tmp_path, final)
        if self.fsync:
            ticket = self._dirs.request(day)  # the directory's flush starts now, alongside the file's
            fd = os.open(final, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._dirs.wait(ticket)
        return str(final.relative_to(self.data_dir)), size

    def path(self, rel: str) -> Path:
        """Absolute path of an indexed file; refuses anything that leaves the spool."""
        p = (self.data_dir / rel).resolve()
        if self.store.resolve() not in p.parents:
            raise ValueError("path outside the spool store")
        return p

    def remove(self, rel: str) -> None:
        try:
            self.path(rel).unlink()
        except FileNotFoundError:
            pass

    def recover(self, known_paths: set[str]) -> tuple[int, int]:
        """At start-up: drop half-received temporaries; move stored files the index never got.

        A file in ``store`` without an index row was renamed but the node died
        before the commit, so its Success was never sent and the PACS will
        resend it. It is moved aside (not deleted) so nothing is lost.
        """
        removed = 0
        for p in self.tmp.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                removed += 1
        orphaned = 0
        for p in self.store.rglob("*.dcm"):
            rel = str(p.relative_to(self.data_dir))
            if rel not in known_paths:
                self.orphans.mkdir(parents=True, exist_ok=True)
                os.replace(p, self.orphans / p.name)
                orphaned += 1
        if removed or orphaned:
            log.warning("spool recovery: %d partial temporary file(s) removed, %d unindexed file(s) moved to %s",
                        removed, orphaned, self.orphans)
        return removed, orphaned


class DirectorySync:
    """Directory fsyncs in a helper thread, shared by every caller waiting (group commit).

    ``request(d)`` returns a ticket; ``wait(ticket)`` returns once an fsync of
    ``d`` that *started after* the request has finished, or raises that
    fsync's error. The thread takes every directory requested so far in one
    round, so N concurrent commits cost one round, not N fsyncs.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: set[Path] = set()
        self._requested = 0  # tickets handed out
        self._done = 0  # every ticket up to this one is covered by a finished round
        # (first ticket, last ticket, error) of recent failed rounds; a waiter raises its round's error
        self._errors: deque[tuple[int, int, OSError]] = deque(maxlen=64)
        self._thread: threading.Thread | None = None

    def request(self, directory: Path) -> int:
        with self._cond:
            self._pending.add(directory)
            self._requested += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spool-dirsync", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self._requested

    def wait(self, ticket: int) -> None:
        with self._cond:
            while self._done < ticket:
                self._cond.wait()
            for first, last, exc in self._errors:
                if first <= ticket <= last:
                    raise exc

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                dirs, self._pending = self._pending, set()
                first, target = self._done + 1, self._requested
            error: OSError | None = None
            for d in dirs:
                try:
                    _fsync_path(d)
                except OSError as exc:
                    error = exc
            with self._cond:
                if error is not None:
                    self._errors.append((first, target, error))
                self._done = target
                self._cond.notify_all()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
