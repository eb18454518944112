"""What the HTTP side is given: the settings, the index, and (inside ``dicomnode serve``) hooks into the live node.

Torch-free and node-free (floor 4 cannot import the node): the serve process
fills the hooks, ``dicomnode web`` (a distributed set-up where the listener
runs elsewhere) leaves them None and every view falls back to the index.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicomnode.config import Settings
from dicomnode.index.studies import Index


@dataclass
class WebState:
    settings: Settings
    index: Index
    # the node's StorageSCP when the listener runs in this process (None in `dicomnode web`)
    listener: Any = None
    # True once the node's back half (pipeline, dispatcher, assembler) runs; None in `dicomnode web`
    ready: Callable[[], bool] | None = None
    # called after an operator retry so the running node acts at once instead of at its next reconcile
    # (the serve process: the dispatcher's nudge, so a re-queued delivery goes out now)
    nudge: Callable[[], None] | None = None
    # queue one pipeline step now (version id, stage): the pipeline's ``send``, which records ``sent_at``.
    # Why apart from ``nudge``: a step set back to pending keeps the ``sent_at`` of its last message, and
    # the periodic reconcile re-sends a pending step only once that is older than the broker's visibility
    # timeout (an hour), so without an explicit send a retried step would wait that long.
    requeue: Callable[[int, str], None] | None = None
    started_at: float = field(default_factory=time.time)
