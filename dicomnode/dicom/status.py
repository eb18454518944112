"""C-STORE statuses, both ways: what the listener answers, and what an answer means for the outbox.

One rule governs both directions (PS3.4 B.2.3 and C.4.2.1.4):

- **transient, retry later**: 0xA7xx "Refused: Out of Resources" (and 0xFE00,
  cancelled; and no answer at all). Waiting can fix it: disk space comes
  back, an index comes back, a PACS restarts. The listener answers 0xA700
  when *it* cannot store (disk under the watermark, spool unwritable, index
  unavailable), so the PACS keeps the study and sends it again; the outbox
  retries such an answer with backoff.
- **permanent, never retry**: 0xA9xx "Error: Data Set Does Not Match SOP
  Class" and 0xCxxx "Error: Cannot Understand". Sending the same bytes
  again gives the same answer. The listener answers these for data it will
  never store (malformed, truncated, contradicting its command); the outbox
  parks such a delivery at once for an operator, so a PACS is not hammered
  for hours with an object it will never take.
- Warnings (0xB000, 0xB006, 0xB007, any 0xBxxx) mean the object was stored;
  0x0000 is success. Anything else unknown is treated as permanent.

Kept apart from the network code so the table in docs/dispatch.md and
docs/receive.md has exactly one implementation.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from pynetdicom.status import code_to_category

# -- what the listener answers (the 0xC2xx codes are ours, within "Cannot understand") --------
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # transient: our disk, spool or index; the sender should retry
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # permanent: e.g. an image class without pixel data
CANNOT_UNDERSTAND = 0xC210  # permanent: the dataset does not parse
MISSING_OR_INVALID_UID = 0xC212  # permanent: a required UID is absent or not a UID
COMMAND_DATASET_MISMATCH = 0xC213  # permanent: SOP Instance UID differs from the C-STORE request's
PIXEL_DATA_TRUNCATED = 0xC214  # permanent: the dataset ends before its declared contents
SERIES_IN_OTHER_STUDY = 0xC215  # permanent: the series UID is already held under another study
TRANSFER_SYNTAX_MISMATCH = 0xC216  # permanent: the data set is not encoded in its negotiated transfer syntax

CANCELLED = 0xFE00
# Storage-specific warnings (PS3.4 B.2.3): the peer kept the object.
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


def is_transient(status: int) -> bool:
    """A failure that waiting can fix: out of resources (0xA7xx) or cancelled (0xFE00)."""
    return 0xA700 <= status <= 0xA7FF or status == CANCELLED


def is_permanent(status: int) -> bool:
    """A failure that the same bytes will always meet: 0xA9xx or 0xCxxx."""
    return 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


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


def classify_status(status: int | None, comment: str = "") -> Outcome:
    """Classify a C-STORE response status (``None``: no response arrived) by the rule above.

    Warnings mean the object was stored (possibly with coercion), so they
    count as sent; the status is kept so an operator can see it.
    """
    suffix = f": {comment}" if comment else ""
    if status is None:
        return Outcome(Verdict.RETRY, None, "no C-STORE response (DIMSE timeout or association aborted)")
    code = f"0x{status:04X}"
    if status == SUCCESS:
        return Outcome(Verdict.SENT, status, "success")
    if status in STORE_WARNINGS or code_to_category(status) == "Warning":
        return Outcome(Verdict.SENT, status, f"stored with warning {code}{suffix}")
    if is_transient(status):
        what = "operation cancelled by peer" if status == CANCELLED else "peer out of resources"
        return Outcome(Verdict.RETRY, status, f"{what} ({code}){suffix}")
    if 0xA900 <= status <= 0xA9FF:
        return Outcome(Verdict.PARK, status, f"data set does not match SOP class ({code}){suffix}")
    if is_permanent(status):
        return Outcome(Verdict.PARK, status, f"peer cannot understand the object ({code}){suffix}")
    return Outcome(Verdict.PARK, status, f"refused with status {code}{suffix}")


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Delay before the next try after ``attempts`` failed ones: initial, doubling, capped."""
    exponent = min(max(attempts - 1, 0), 60)  # 2**60 * anything positive is past any cap
    return float(min(initial_s * 2**exponent, max_s))
