"""Dispatch: send the node's report objects to the PACS destinations, durably, once per object.

``Outbox`` (rows in the index), ``Dispatcher`` (the thread that pumps it),
``echo_destinations`` (for ``dicomnode echo --destinations``). See docs/dispatch.md.
"""
from __future__ import annotations

from .dispatcher import Dispatcher
from .outbox import PARKED, PENDING, SENT, Delivery, Outbox, PumpResult
from .outcome import Outcome, Verdict, backoff_s, classify_status
from .peer import client_ssl_context, echo_destinations

__all__ = [
    "Delivery", "Dispatcher", "Outbox", "Outcome", "PARKED", "PENDING", "PumpResult", "SENT", "Verdict",
    "backoff_s", "classify_status", "client_ssl_context", "echo_destinations",
]
