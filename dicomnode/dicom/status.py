"""What a send attempt means for a delivery: sent, try again later, or park for an operator.

Kept apart from the network code so the table in docs/dispatch.md has exactly
one implementation, and so the association layer (``peer``) and the outbox
agree on it. The rule of thumb: a failure that waiting can fix (peer down,
busy, out of resources, slow) is retried with backoff; a failure that waiting
cannot fix (the peer refuses this object or this node) is parked at once, so
the outbox does not hammer a PACS for hours with an object it will never take.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from pynetdicom.status import code_to_category


class Verdict(enum.Enum):
    SENT = "sent"
    RETRY = "retry"
    PARK = "park"


@dataclass(frozen=True)
class Outcome:
    """One delivery's result of one attempt; ``reason`` is PHI-free and goes to the index."""

    verdict: Verdict
    status: int | None
    reason: str


# Storage-specific warnings (PS3.4 B.2.3): the peer kept the object.
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


def classify_status(status: int | None, comment: str = "") -> Outcome:
    """Classify a C-STORE response status (``None``: no response arrived).

    Warnings mean the object was stored (possibly with coercion), so they
    count as sent; the status is kept so an operator can see it.
    """
    suffix = f": {comment}" if comment else ""
    if status is None:
        return Outcome(Verdict.RETRY, None, "no C-STORE response (DIMSE timeout or association aborted)")
    code = f"0x{status:04X}"
    if status == 0x0000:
        return Outcome(Verdict.SENT, status, "success")
    if status in STORE_WARNINGS or code_to_category(status) == "Warning":
        return Outcome(Verdict.SENT, status, f"stored with warning {code}{suffix}")
    if 0xA700 <= status <= 0xA7FF:
        return Outcome(Verdict.RETRY, status, f"peer out of resources ({code}){suffix}")
    if status == 0xFE00:
        return Outcome(Verdict.RETRY, status, f"operation cancelled by peer ({code}){suffix}")
    if 0xA900 <= status <= 0xA9FF:
        return Outcome(Verdict.PARK, status, f"data set does not match SOP class ({code}){suffix}")
    if 0xC000 <= status <= 0xCFFF:
        return Outcome(Verdict.PARK, status, f"peer cannot understand the object ({code}){suffix}")
    return Outcome(Verdict.PARK, status, f"refused with status {code}{suffix}")


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: initial, doubling, capped."""
    exponent = min(max(attempts - 1, 0), 60)  # 2**60 * anything positive is past any cap
    return float(min(initial_s * 2**exponent, max_s))
