"""Serving the HTTP side: inside ``dicomnode serve`` (a thread) or alone (``dicomnode web``)."""
from __future__ import annotations

from typing import Any

from dicomnode.config import Settings


class WebServer:
    """uvicorn in a thread of the serve process; ``listener`` is the node's StorageSCP (None in ``dicomnode web``)."""

    def __init__(self, settings: Settings, *, listener: Any = None, ready: Any = None) -> None:
        raise NotImplementedError  # being written

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def run_web(settings: Settings) -> int:
    """``dicomnode web``: the HTTP side alone, until SIGTERM/SIGINT; the exit status."""
    raise NotImplementedError
