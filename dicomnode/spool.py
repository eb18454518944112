"""The durable spool: received files under names the node makes up.

A received dataset lands first in ``spool/tmp`` (pynetdicom streams it there
while it arrives, so memory does not grow with instance size), is fsynced, then
renamed atomically into ``spool/store/YYYYMMDD/<random>.dcm`` and the directory
fsynced. No part of any path ever comes from a received value: a UID such as
``../../x`` cannot steer a write (pynetdicom issue 823; dcmtk CVE-2022-2119).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
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

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def commit(self, tmp_path: Path) -> tuple[str, int]:
        """Make a fully received temporary file durable under a generated name.

        Returns the path relative to ``data_dir`` (what the index records) and
        the size. The caller removes the temporary file on any exception.
        """
        day = self.store / time.strftime("%Y%m%d", time.gmtime())
        if not day.is_dir():
            day.mkdir(parents=True, exist_ok=True)
            self._fsync_dir(self.store)
        final = day / f"{uuid.uuid4().hex}.dcm"
        if self.fsync:
            fd = os.open(tmp_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        size = os.stat(tmp_path).st_size
        os.replace(tmp_path, final)
        self._fsync_dir(day)
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

    def _fsync_dir(self, d: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
