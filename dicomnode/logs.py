"""Logging set-up and PHI-safe identifiers.

Sits at the bottom of the import graph with ``config``: it imports nothing of
ours. Patient data is sensitive, so log lines at INFO and above name studies by
the index id or a short one-way tag of the UID, never by patient name, ID or
birth date.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time


def uid_tag(uid: str | None) -> str:
    """A short stable tag for a UID, to correlate log lines without quoting it."""
    if not uid:
        return "-"
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:10]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Configure the root logger once, at the edge (the CLI)."""
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs dataset contents (patient names included) at DEBUG and
    # association chatter at INFO: keep it at WARNING unless we debug.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level.upper() == "DEBUG" else "WARNING")
