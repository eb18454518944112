"""Atomic file writes, written once: a reader never sees half a file, and a crash leaves the old one or the new one.

Why one helper: the spool, the hand-off records, the conversion manifest and the
report objects all need the same dance (a UNIQUE temporary name in the target
directory, fsync, rename, fsync of the directory); a fixed temporary name lets two
writers (a redelivered step racing a slow one) tear each other's file.
Imports nothing of ours (bottom floor).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """A temporary path beside ``path`` that no other writer (process or thread) will pick."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the directory entry is data of the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str | Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Write ``data`` (bytes, text, or a function that writes a given path) to ``path`` atomically.

    ``fsync`` False skips the two fsyncs: for files that are cheap to rebuild (a memo, a manifest that
    is re-derived when missing) where durability after power loss buys nothing.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)
    return path
