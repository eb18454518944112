"""Confirmed delivery: the PACS vouches for each report object it took, or the node sends it again.

A C-STORE Success says the PACS received an object, not that it still has it
an hour later (a full archive, a failed ingest, an operator who deleted the
"wrong" series). The outbox (``stages/dispatch``) therefore keeps a delivery
"sent, awaiting confirmation" until the destination confirms it, in one of two
ways (``DestinationSettings.confirm``; docs/dispatch.md, "Confirmed delivery"):

- ``commitment``: Storage Commitment Push Model (PS3.4 Annex J). The node
  sends an N-ACTION-RQ (Action Type 1) naming a Transaction UID and the SOP
  instances; the PACS answers later with an N-EVENT-REPORT-RQ (Event Type 1:
  all committed, 2: some failed, with a Failure Reason each), either on the
  same association while it is open or on a NEW association it opens to the
  node's listener. Orthanc does the latter (it looks the node up in its
  ``DicomModalities`` by calling AE title). So the report can arrive in any
  process that listens for the node, long after the pump moved on: the
  Transaction UID is written to the rows *before* the N-ACTION goes out, and
  :func:`on_event_report` settles rows by it, from the index alone.
- ``find``: a C-FIND at IMAGE level (Study Root) for each SOP Instance UID,
  with the object's Study and Series Instance UIDs as the required unique
  keys of the levels above. Found means confirmed. Weaker than commitment (the
  PACS has indexed it, it has not promised to keep it) but nearly every PACS
  answers it and it needs no inbound connection.

What an answer does to a delivery row is decided here once (:func:`settle`),
for answers that arrive on the pump's association and on the listener's alike:
confirmed; missing (a commitment failure or "not found": back to pending with
the outbox's backoff, so the same bytes go out again); asked (wait for the
report until ``confirm_timeout_s``, then ask again in a new transaction);
retry (no answer, busy peer: ask again with backoff); failed (the peer does not
offer the service or refuses us: the delivery stays sent, marked unconfirmed,
because sending it again would not change the answer).

Floor 1: this module knows the index and the SCU, never the pipeline.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import select, update
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.config import DestinationSettings, Settings
from dicomnode.dicom.scu import AssociationFailed, Timeouts, associate
from dicomnode.dicom.status import Verdict, backoff_s
from dicomnode.index.schema import Delivery
from dicomnode.index.studies import Index
from dicomnode.logs import uid_tag

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance (PS3.4 J.3.1)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
_IMPLICIT = str(ImplicitVRLittleEndian)  # the default transfer syntax every peer must accept

# The outbox's row states (``deliveries.state``); stages/dispatch re-exports them. Defined here because
# this module writes them too: a commitment failure that reaches the listener re-queues the row itself.
PENDING = "pending"
SENT = "sent"
PARKED = "parked"

# ``deliveries.confirmation`` of a sent row (NULL: not sent, or sent before revision 0003)
AWAITING = "awaiting"
CONFIRMED = "confirmed"
UNCONFIRMED = "unconfirmed"  # the destination's confirm = "none": today's fire-and-forget
FAILED = "failed"  # the PACS cannot or will not confirm (confirm_error says why); the delivery stays sent

COMMITMENT, FIND, NONE = "commitment", "find", "none"  # DestinationSettings.confirm

# Failure Reason (0008,1197) values, PS3.4 J.3.3.1.1 (and C.4.2.1.4 for 0x0213)
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}
# N-ACTION statuses after which asking again cannot help: the peer does not do storage commitment
_ACTION_UNSUPPORTED = {0x0112, 0x0118, 0x0122, 0x0123, 0x0211}


class Answer(enum.Enum):
    """What one confirmation step learnt about one delivery."""

    CONFIRMED = "confirmed"  # committed by the PACS, or found by C-FIND
    MISSING = "missing"  # the PACS does not have it: send it again
    ASKED = "asked"  # N-ACTION accepted; the N-EVENT-REPORT is owed (until confirm_timeout_s)
    RETRY = "retry"  # no answer / busy / transient: ask again later with backoff
    FAILED = "failed"  # the peer does not offer or refuses the service: stays sent, unconfirmed
    OFF = "off"  # the destination is now configured with confirm = "none"


@dataclass(frozen=True)
class Confirmation:
    """One delivery's confirmation outcome; ``reason`` is PHI-free (it goes to the index and the log)."""

    answer: Answer
    reason: str
    wait_s: float = 0.0  # ASKED: how long the report may take before the node asks again


@dataclass(frozen=True)
class Item:
    """A delivered object to confirm: its row id, UIDs and the file that was sent (for C-FIND's keys)."""

    id: int
    sop_class_uid: str
    sop_instance_uid: str
    path: Path | None = None


# -- the listener's part ------------------------------------------------------------------------


def add_commitment_context(ae: AE) -> None:
    """Let ``ae`` (the node's listener) accept Storage Commitment Push Model with either role.

    A PACS that reports on a new association is the association requestor but
    the SCP of the SOP class, so it proposes SCP/SCU Role Selection (Orthanc
    does: SCU role 0, SCP role 1); accepting both roles lets pynetdicom agree
    to what the PACS proposes rather than reject the context.
    """
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)


def commitment_handlers(index: Index, settings: Settings) -> list[tuple[Any, Callable[[Any], Any]]]:
    """The listener's (event, handler) pairs for N-EVENT-REPORTs that PACSs send on new associations."""
    return [(evt.EVT_N_EVENT_REPORT, lambda event: on_event_report(index, settings, event))]


def on_event_report(index: Index, settings: Settings, event: Any) -> tuple[int, Dataset | None]:
    """Settle the rows of a Storage Commitment N-EVENT-REPORT; answers the PACS's request with a status.

    Always Success once the report is read, even for a transaction this node
    no longer waits for (superseded by a later N-ACTION, or a restart): the
    PACS has done its part, and a failure status would only make it retry.
    """
    req = event.request
    if str(getattr(req, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT_PUSH:
        return 0x0110, None
    try:
        info = event.event_information
        txn = str(info.TransactionUID)
        committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
        failed = {str(i.ReferencedSOPInstanceUID): _failure_text(i.get("FailureReason")) for i in
                  info.get("FailedSOPSequence", [])}
    except Exception as exc:  # a report we cannot read: tell the PACS, keep the rows waiting
        log.warning("storage commitment report from %s unreadable: %s", _peer(event), type(exc).__name__)
        return 0x0110, None
    n = apply_commitment_report(index, settings, txn, committed, failed)
    how = "on a new association" if getattr(event.assoc, "is_acceptor", False) else "on the N-ACTION's association"
    log.info("storage commitment report (event type %s) from %s %s for transaction %s: %d committed, %d failed, "
             "%d delivery(ies) settled", getattr(req, "EventTypeID", "?"), _peer(event), how, uid_tag(txn),
             len(committed), len(failed), n)
    return 0x0000, None


def _peer(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title if event.assoc.is_acceptor else event.assoc.acceptor.ae_title)
    except Exception:
        return "?"


def _failure_text(code: Any) -> str:
    if code is None:
        return "storage commitment failed (no failure reason given)"
    code = int(code)
    return f"storage commitment failed: 0x{code:04X} {FAILURE_REASONS.get(code, 'unknown failure reason')}"


def apply_commitment_report(index: Index, settings: Settings, txn: str, committed: Sequence[str],
                            failed: Mapping[str, str], now: float | None = None) -> int:
    """Settle the rows still awaiting transaction ``txn``: committed ones confirmed, failed ones re-sent.

    Rows the report does not name keep waiting (until their deadline, then the
    node asks again). Returns the number of rows settled.
    """
    now = time.time() if now is None else now
    with index.engine.connect() as c:
        rows = c.execute(select(Delivery.id, Delivery.sop_instance_uid)
                         .where(Delivery.confirm_txn_uid == txn)).all()
    outcomes: dict[int, Confirmation] = {}
    for row_id, uid in rows:
        if uid in failed:
            outcomes[row_id] = Confirmation(Answer.MISSING, failed[uid])
        elif uid in committed:
            outcomes[row_id] = Confirmation(Answer.CONFIRMED, "committed by the PACS (storage commitment)")
    if not outcomes:
        return 0
    settled = settle(index, settings, outcomes, now, Delivery.confirm_txn_uid == txn)
    return sum(len(ids) for ids in settled.values())


# -- settling rows: the one place that decides what an answer does --------------------------------


def settle(index: Index, settings: Settings, outcomes: Mapping[int, Confirmation], now: float,
           guard: ColumnElement[bool]) -> dict[Answer, list[int]]:
    """Write each row's confirmation outcome in one transaction, only where ``guard`` still holds.

    Every update also requires the row to be sent and awaiting confirmation,
    so an answer that arrives twice (the same association and a new one, or a
    late report after a timeout) settles a row once. Returns the ids settled,
    by answer; events and log lines follow the transaction.
    """
    s = settings
    out: dict[Answer, list[int]] = {}
    notes: list[tuple[Answer, Any, Confirmation, dict[str, Any]]] = []
    if not outcomes:
        return out
    with index.engine.begin() as c:
        rows = c.execute(
            select(Delivery.id, Delivery.study_id, Delivery.destination, Delivery.sop_instance_uid,
                   Delivery.attempts, Delivery.confirm_attempts)
            .where(Delivery.id.in_(list(outcomes)), Delivery.state == SENT, Delivery.confirmation == AWAITING, guard)
        ).all()
        for row in rows:
            o = outcomes[row.id]
            answer = o.answer
            values: dict[str, Any] = {"claimed_until": None, "claim_token": None}
            if answer is Answer.CONFIRMED:
                values.update(confirmation=CONFIRMED, confirmed_at=now, confirm_next_at=None, confirm_error=None)
            elif answer is Answer.MISSING:
                attempts = row.attempts
                if attempts >= s.dispatch_max_attempts:
                    values.update(state=PARKED, last_error=f"the destination lost it after {attempts} sends; "
                                                           f"last: {o.reason}")
                else:
                    values.update(state=PENDING, last_error=o.reason, next_attempt_at=now + backoff_s(
                        max(1, attempts), s.dispatch_retry_initial_s, s.dispatch_retry_max_s))
                values.update(confirmation=None, confirm_next_at=None, confirm_txn_uid=None, confirm_error=o.reason)
            elif answer is Answer.ASKED:
                values.update(confirm_next_at=now + o.wait_s, confirm_error=None)
            elif answer is Answer.RETRY:
                n = max(1, row.confirm_attempts)  # the asker counted this attempt when it claimed the row
                if n >= s.dispatch_max_attempts:
                    answer = Answer.FAILED
                    values.update(confirmation=FAILED, confirm_next_at=None,
                                  confirm_error=f"gave up after {n} attempts; last: {o.reason}")
                else:
                    values.update(confirm_error=o.reason, confirm_next_at=now + backoff_s(
                        n, s.dispatch_retry_initial_s, s.dispatch_retry_max_s))
            elif answer is Answer.FAILED:
                values.update(confirmation=FAILED, confirm_next_at=None, confirm_error=o.reason)
            else:  # OFF
                values.update(confirmation=UNCONFIRMED, confirm_next_at=None, confirm_error=None)
            done = c.execute(update(Delivery).where(Delivery.id == row.id, Delivery.state == SENT,
                                                    Delivery.confirmation == AWAITING, guard)
                             .values(**values).returning(Delivery.id)).first()
            if done is None:
                continue
            out.setdefault(answer, []).append(row.id)
            notes.append((answer, row, o, values))
    for answer, row, o, values in notes:
        _note(index, answer, row, o, values, now)
    return out


def _note(index: Index, answer: Answer, row: Any, o: Confirmation, values: dict[str, Any], now: float) -> None:
    """The log line and event of one settled row (ids, UID tags and destinations only: never patient data)."""
    what = f"delivery {row.id} (study {row.study_id}, object {uid_tag(row.sop_instance_uid)}) to {row.destination}"
    kind: str | None = None
    if answer is Answer.CONFIRMED:
        kind, message = "delivery_confirmed", f"{what}: confirmed ({o.reason})"
        log.info("%s", message)
    elif answer is Answer.MISSING:
        if values.get("state") == PARKED:
            kind, message = "delivery_parked", f"{what}: parked: {values['last_error']}"
            log.error("%s", message)
        else:
            kind = "delivery_resend"
            message = f"{what}: not confirmed ({o.reason}); sending again in {values['next_attempt_at'] - now:.1f}s"
            log.warning("%s", message)
    elif answer is Answer.FAILED:
        kind, message = "delivery_unconfirmed", f"{what}: cannot be confirmed: {values['confirm_error']}"
        log.warning("%s", message)
    elif answer is Answer.RETRY:
        log.info("%s: confirmation attempt %d failed (%s); asking again in %.1fs", what, row.confirm_attempts,
                 o.reason, values["confirm_next_at"] - now)
    elif answer is Answer.ASKED:
        log.info("%s: storage commitment requested; report owed within %.0fs", what, o.wait_s)
    if kind is not None:
        index.add_event(kind, message, study_id=row.study_id, delivery_id=row.id, destination=row.destination)


# -- asking: the SCU's part --------------------------------------------------------------------------


def _failure(failed: AssociationFailed) -> Confirmation:
    o = failed.outcome
    return Confirmation(Answer.FAILED if o.verdict is Verdict.PARK else Answer.RETRY, o.reason)


def request_commitment(dest: DestinationSettings, items: Sequence[Item], txn_uid: str, *, index: Index,
                       settings: Settings, wait_s: float = 5.0) -> Confirmation:
    """Send one N-ACTION-RQ for ``items`` under ``txn_uid``; the rows must already carry ``txn_uid``.

    The association stays open up to ``wait_s`` after the N-ACTION-RSP (or
    until the rows are settled through the listener), for PACSs that report
    on the same association; the report is then handled exactly as the
    listener handles one. The answer is for the whole batch: ASKED when the
    PACS accepted the request (the report settles the rows, now or later).
    """
    ds = Dataset()
    ds.TransactionUID = txn_uid
    refs = []
    for it in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = it.sop_class_uid
        ref.ReferencedSOPInstanceUID = it.sop_instance_uid
        refs.append(ref)
    ds.ReferencedSOPSequence = refs
    reported = threading.Event()

    def on_report(event: Any) -> tuple[int, Dataset | None]:
        answer = on_event_report(index, settings, event)
        reported.set()
        return answer

    asked = Confirmation(Answer.ASKED, "storage commitment requested", wait_s=dest.confirm_timeout_s)
    try:
        with associate(dest, [(STORAGE_COMMITMENT_PUSH, _IMPLICIT)], calling_ae=settings.ae_title,
                       timeouts=Timeouts.of(settings), max_pdu=settings.max_pdu) as assoc:
            assoc.bind(evt.EVT_N_EVENT_REPORT, on_report)
            try:
                status, _reply = assoc.send_n_action(ds, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
            except RuntimeError:  # the association ended before the request could go
                return Confirmation(Answer.RETRY, "association ended before the N-ACTION was sent")
            if "Status" not in status:
                return Confirmation(Answer.RETRY, "no N-ACTION response (DIMSE timeout or association aborted)")
            code = int(status.Status)
            if code != 0x0000:
                text = f"{dest.name} answered the storage commitment N-ACTION with status 0x{code:04X}"
                return Confirmation(Answer.FAILED if code in _ACTION_UNSUPPORTED else Answer.RETRY, text)
            deadline = time.monotonic() + min(wait_s, dest.confirm_timeout_s)
            while time.monotonic() < deadline and assoc.is_established:
                if reported.wait(0.2) or not _awaiting(index, txn_uid):
                    break
    except AssociationFailed as failed:
        return _failure(failed)
    return asked


def _awaiting(index: Index, txn_uid: str) -> bool:
    """Whether any row of the transaction still waits for its report (settled through the listener, or not)."""
    with index.engine.connect() as c:
        return c.execute(select(Delivery.id).where(Delivery.confirm_txn_uid == txn_uid,
                                                   Delivery.confirmation == AWAITING).limit(1)).first() is not None


def find_instances(dest: DestinationSettings, items: Sequence[Item], *, settings: Settings) -> dict[int, Confirmation]:
    """C-FIND (Study Root, IMAGE level) each item's SOP Instance UID on one association: found = confirmed.

    The Study and Series Instance UIDs, required unique keys of the levels
    above IMAGE, come from the file that was sent; if that file is gone they
    are left empty (universal match), which permissive PACSs accept.
    """
    out: dict[int, Confirmation] = {}
    try:
        with associate(dest, [(STUDY_ROOT_FIND, _IMPLICIT)], calling_ae=settings.ae_title,
                       timeouts=Timeouts.of(settings), max_pdu=settings.max_pdu) as assoc:
            for it in items:
                out[it.id] = _find_one(assoc, dest, it)
    except AssociationFailed as failed:
        o = _failure(failed)
        return {it.id: o for it in items}
    return out


def _identifier(it: Item) -> Dataset:
    study = series = ""
    if it.path is not None and it.path.is_file():
        try:
            ds = dcmread(it.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        except Exception:  # unreadable now: query with universal matching above IMAGE level
            pass
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study
    q.SeriesInstanceUID = series
    q.SOPInstanceUID = it.sop_instance_uid
    return q


def _find_one(assoc: Any, dest: DestinationSettings, it: Item) -> Confirmation:
    if not assoc.is_established:
        return Confirmation(Answer.RETRY, "association ended before this object was looked up")
    found = False
    final: int | None = None
    try:
        for status, ident in assoc.send_c_find(_identifier(it), STUDY_ROOT_FIND):
            if "Status" not in status:  # no response: DIMSE timeout or association aborted
                final = None
                break
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if ident is not None and str(ident.get("SOPInstanceUID", "")) == it.sop_instance_uid:
                    found = True
            else:
                final = code
    except RuntimeError:  # the association ended between two objects
        return Confirmation(Answer.RETRY, "association ended before this object was looked up")
    if final is None:
        return Confirmation(Answer.RETRY, f"no C-FIND response from {dest.name} (timeout, or the association was "
                                          "aborted: e.g. the PACS does not let this AE title query)")
    if final == 0x0000:
        if found:
            return Confirmation(Answer.CONFIRMED, "found by C-FIND")
        return Confirmation(Answer.MISSING, f"{dest.name} does not have it (C-FIND found no such instance)")
    text = f"C-FIND refused by {dest.name} with status 0x{final:04X}"
    if 0xA700 <= final <= 0xA7FF or final == 0xFE00:
        return Confirmation(Answer.RETRY, text)
    return Confirmation(Answer.FAILED, text)
