"""The outbox: every report object the node owes a PACS, as rows in the index.

Sending is the last arrow of the pipeline and the one that meets other
people's outages, so it is a durable queue rather than a function call: the
report stage enqueues files and returns; a pump (the ``Dispatcher`` thread,
or any process sharing the index) sends what is due. A row is one object for
one destination; ``UNIQUE(destination, sop_instance_uid)`` makes enqueueing
idempotent, so re-running a pipeline never sends a second copy.

Concurrency: rows are claimed by a conditional UPDATE that sets a lease
(``claimed_until``, ``claim_token``) in one short transaction; the network
I/O runs outside any transaction, and the outcome is written in another
short one, guarded by the token. Two pumps on two hosts therefore never send
the same row at once. A pump that dies mid-send leaves a lease that expires;
the row is then sent again with the same SOP Instance UID, which a PACS
treats as the same object (delivery is at-least-once, never a second report).

Confirmation (``dicomnode.dicom.commit``; docs/dispatch.md, "Confirmed
delivery"): a sent row also carries ``confirmation``. Each pump first asks the
destinations to vouch for rows sent earlier (storage commitment or C-FIND, per
destination), claimed like sends; a PACS that lost an object puts its row back
to pending, so the same bytes go out again with the usual backoff. ``state``
keeps its meaning (``sent``: the PACS answered the C-STORE with success), so
readers of ``state`` and ``summary()`` are unchanged; ``confirmation`` says
how far the PACS has vouched for it.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from dicomnode.config import DestinationSettings, Settings
from dicomnode.dicom.commit import (
    AWAITING, COMMITMENT, CONFIRMED, FAILED, FIND, NONE, PARKED, PENDING, SENT, UNCONFIRMED, Answer, Confirmation,
    Item, find_instances, request_commitment, settle,
)
from dicomnode.dicom.scu import OutgoingFile, Timeouts, store
from dicomnode.dicom.status import Outcome, Verdict, backoff_s
from dicomnode.index.schema import Delivery
from dicomnode.index.studies import Index, VersionInfo
from dicomnode.logs import uid_tag
from dicomnode.stages.context import StageContext

log = logging.getLogger(__name__)

# the row states (defined in dicom.commit, which writes them too): "sent" = the C-STORE succeeded
STATES = (PENDING, SENT, PARKED)
CONFIRMATIONS = (AWAITING, CONFIRMED, UNCONFIRMED, FAILED)  # of a sent row; see dicom.commit

# One wording for "nothing configured to send to", wherever an operator meets it: the serve start-up
# warning and this stage's answer begin with NO_DESTINATIONS; a version's delivery in status says
# NOT_SENT_NO_DESTINATION (reports are still written under data_dir/reports).
NO_DESTINATIONS = "no destinations configured"
NOT_SENT_NO_DESTINATION = "not sent: no destination"


@dataclass
class PumpResult:
    """Delivery ids by what one pump did to them."""

    sent: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    parked: list[int] = field(default_factory=list)
    lost_claims: list[int] = field(default_factory=list)  # lease expired and taken over while we sent
    # confirmation of rows sent in earlier pumps (not sends, so not in ``attempted``)
    confirmed: list[int] = field(default_factory=list)
    resend: list[int] = field(default_factory=list)  # the PACS does not have it: pending again (or parked)
    confirm_waiting: list[int] = field(default_factory=list)  # commitment asked, report owed; or ask again later
    unconfirmable: list[int] = field(default_factory=list)  # the PACS cannot or will not confirm

    @property
    def attempted(self) -> int:
        """Send attempts (C-STOREs), as before confirmation existed."""
        return len(self.sent) + len(self.retrying) + len(self.parked) + len(self.lost_claims)


@dataclass(frozen=True)
class _Claimed:
    id: int
    study_id: int | None
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    attempts: int


class Outbox:
    """Enqueue report files for every destination; pump sends what is due; operators retry what parked.

    ``batch_size`` bounds the rows one pump claims per destination, so a
    backlog is worked off in leases short enough to recover from a crash.
    """

    def __init__(self, index: Index, settings: Settings, *, batch_size: int = 50) -> None:
        self.index = index
        self.settings = settings
        self.engine = index.engine
        self.batch_size = batch_size

    # -- enqueue -----------------------------------------------------------------------

    def enqueue(
        self, files: Sequence[Path], *, study_id: int | None, version_id: int | None, now: float | None = None
    ) -> int:
        """Owe every file to every configured destination; returns the number of new rows.

        UIDs are read from each file's meta header, which is what the chunked
        send puts on the wire, so the row and the sent object always agree.
        """
        now = time.time() if now is None else now
        described = [self._describe(Path(f)) for f in files]  # file I/O before the transaction
        destinations = self.settings.destinations
        if not destinations:
            if described:
                log.warning("no dispatch destinations configured: %d report object(s) not queued", len(described))
            return 0
        added = 0
        with self.engine.begin() as c:
            for rel, sop_class, sop_instance, ts in described:
                for dest in destinations:
                    added += self._insert_ignore(
                        c,
                        {
                            "study_id": study_id,
                            "version_id": version_id,
                            "destination": dest.name,
                            "sop_instance_uid": sop_instance,
                            "sop_class_uid": sop_class,
                            "transfer_syntax_uid": ts,
                            "path": rel,
                            "state": PENDING,
                            "attempts": 0,
                            "next_attempt_at": now,
                            "last_error": "",
                            "created_at": now,
                        },
                    )
        if added:
            self.index.add_event(
                "delivery_queued",
                f"study {study_id}: {added} delivery(ies) queued for {len(destinations)} destination(s)",
                study_id=study_id,
                version_id=version_id,
                deliveries=added,
            )
            log.info("study %s: %d delivery(ies) queued", study_id, added)
        return added

    def _describe(self, path: Path) -> tuple[str, str, str, str]:
        """(path relative to data_path, SOP class, SOP instance, transfer syntax) of a file to send."""
        full = path.resolve()
        try:
            rel = full.relative_to(self.settings.data_path).as_posix()
        except ValueError:
            raise ValueError(f"{path} is not under the data directory {self.settings.data_path}") from None
        meta = dcmread(full, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
        missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
                   if k not in meta]
        if missing:
            raise ValueError(f"{path}: file meta lacks {', '.join(missing)}; it cannot be sent as stored")
        return rel, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID), str(meta.TransferSyntaxUID)

    def _insert_ignore(self, c: Connection, values: dict[str, Any]) -> int:
        """INSERT unless (destination, SOP instance) exists; 1 if a row was added."""
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            dialect_insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
            stmt = (
                dialect_insert(Delivery)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"])
                .returning(Delivery.id)
            )
            # RETURNING, not rowcount: psycopg reports -1 for a conflicting no-op
            return len(c.execute(stmt).all())
        try:  # other databases: a savepoint per row
            with c.begin_nested():
                c.execute(insert(Delivery).values(**values))
            return 1
        except IntegrityError:
            return 0

    # -- pump --------------------------------------------------------------------------

    def pump(self, now: float | None = None) -> PumpResult:
        """Send every due row: one association per destination (more only past 128 contexts).

        ``now`` is the clock the pump judges due-ness and backoff by; time
        spent on the network is added to it for the outcome.
        """
        now = time.time() if now is None else now
        started = time.monotonic()
        result = PumpResult()
        configured = {d.name: d for d in self.settings.destinations}
        # confirm first: what this pump sends is confirmed by a later one, after the destination's confirm_after_s
        self._confirm(now, configured, result)
        now += time.monotonic() - started
        started = time.monotonic()
        for name, ids in self._due(now).items():
            rows, token = self._claim(ids, now)
            if not rows:
                continue
            dest = configured.get(name)
            if dest is None:
                outcomes = {r.id: Outcome(Verdict.PARK, None, f"destination {name} is no longer configured")
                            for r in rows}
            else:
                try:
                    outcomes = self._send(dest, rows)
                except BaseException:
                    self._release(token)  # let the next pump (here or elsewhere) have them now, not after the lease
                    raise
            self._record(rows, token, outcomes, now + (time.monotonic() - started), result, dest)
        return result

    def _due(self, now: float) -> dict[str, list[int]]:
        """Ids of due, unclaimed rows per destination (a read; the claim re-checks)."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(Delivery.id, Delivery.destination)
                .where(
                    Delivery.state == PENDING,
                    Delivery.next_attempt_at <= now,
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
                )
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(self.batch_size * max(1, len(self.settings.destinations)) * 4)
            ).all()
        out: dict[str, list[int]] = {}
        for row_id, dest in rows:
            ids = out.setdefault(dest, [])
            if len(ids) < self.batch_size:
                ids.append(row_id)
        return out

    def _lease_s(self, n: int) -> float:
        """Long enough for an association and ``n`` C-STOREs at their timeouts, so a live pump keeps its rows."""
        s = self.settings
        return s.acse_timeout_s + s.network_timeout_s + s.dimse_timeout_s * (n + 1)

    def _claim(self, ids: list[int], now: float) -> tuple[list[_Claimed], str]:
        """Take a lease on those of ``ids`` still pending, due and unclaimed: one conditional UPDATE.

        The conditions are in the UPDATE itself, so on PostgreSQL a second
        claimer blocks on the row lock, re-checks, and finds the lease taken;
        on SQLite writers are serialised anyway.
        """
        token = uuid.uuid4().hex
        with self.engine.begin() as c:
            c.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(ids),
                    Delivery.state == PENDING,
                    Delivery.next_attempt_at <= now,
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
                )
                .values(claimed_until=now + self._lease_s(len(ids)), claim_token=token)
            )
            rows = c.execute(
                select(
                    Delivery.id, Delivery.study_id, Delivery.destination, Delivery.sop_instance_uid,
                    Delivery.sop_class_uid, Delivery.transfer_syntax_uid, Delivery.path, Delivery.attempts,
                )
                .where(Delivery.claim_token == token)
                .order_by(Delivery.id)
            ).all()
        return [_Claimed(*r) for r in rows], token

    def _release(self, token: str) -> None:
        with self.engine.begin() as c:
            c.execute(
                update(Delivery).where(Delivery.claim_token == token).values(claimed_until=None, claim_token=None)
            )

    def _send(self, dest: DestinationSettings, rows: list[_Claimed]) -> dict[int, Outcome]:
        """C-STORE the claimed rows' files as stored (the SCU's one loop); no database access here."""
        outcomes: dict[int, Outcome] = {}
        files: list[OutgoingFile] = []
        for r in rows:
            path = self.settings.data_path / r.path
            if path.is_file():
                files.append(OutgoingFile(path, r.sop_class_uid, r.transfer_syntax_uid, ref=r.id))
            else:
                outcomes[r.id] = Outcome(Verdict.PARK, None, f"file {r.path} is missing from the data directory")
        s = self.settings
        for f, outcome in store(dest, files, calling_ae=s.ae_title, timeouts=Timeouts.of(s), max_pdu=s.max_pdu):
            assert f.ref is not None
            outcomes[f.ref] = outcome
        return outcomes

    def _record(
        self, rows: list[_Claimed], token: str, outcomes: dict[int, Outcome], now: float, result: PumpResult,
        dest: DestinationSettings | None = None,
    ) -> None:
        """Write every outcome in one short transaction (guarded by the claim token), then the events."""
        s = self.settings
        events: list[tuple[str, str, _Claimed, Outcome, dict[str, Any]]] = []
        with self.engine.begin() as c:
            for r in rows:
                o = outcomes[r.id]
                attempts = r.attempts + 1
                values: dict[str, Any] = {
                    "attempts": attempts, "last_status": o.status, "claimed_until": None, "claim_token": None,
                }
                if o.verdict is Verdict.SENT:
                    values.update(state=SENT, sent_at=now, last_error="" if o.status == 0 else o.reason,
                                  **_awaiting_confirmation(dest, now))
                    kind, bucket = "delivery_sent", result.sent
                elif o.verdict is Verdict.RETRY and attempts < s.dispatch_max_attempts:
                    delay = backoff_s(attempts, s.dispatch_retry_initial_s, s.dispatch_retry_max_s)
                    values.update(state=PENDING, next_attempt_at=now + delay, last_error=o.reason)
                    kind, bucket = "delivery_retry", result.retrying
                else:
                    reason = o.reason
                    if o.verdict is Verdict.RETRY:
                        reason = f"gave up after {attempts} attempts; last: {o.reason}"
                    values.update(state=PARKED, last_error=reason)
                    o = Outcome(o.verdict, o.status, reason)
                    kind, bucket = "delivery_parked", result.parked
                res = c.execute(
                    update(Delivery).where(Delivery.id == r.id, Delivery.claim_token == token).values(**values)
                    .returning(Delivery.id)
                )
                if res.first() is None:
                    log.warning("delivery %d: lease expired and was taken over before the outcome was written", r.id)
                    result.lost_claims.append(r.id)
                    continue
                bucket.append(r.id)
                events.append((kind, o.reason, r, o, values))
        for kind, reason, r, o, values in events:
            what = f"delivery {r.id} (study {r.study_id}, object {uid_tag(r.sop_instance_uid)}) to {r.destination}"
            status = "-" if o.status is None else f"0x{o.status:04X}"
            if kind == "delivery_sent":
                message = f"{what}: sent, status {status}"
                log.info("%s", message)
            elif kind == "delivery_retry":
                message = (f"{what}: attempt {values['attempts']} failed ({reason}); "
                           f"retry in {values['next_attempt_at'] - now:.1f}s")
                log.warning("%s", message)
            else:
                message = f"{what}: parked after attempt {values['attempts']}: {reason}"
                log.error("%s", message)
            self.index.add_event(
                kind, message, study_id=r.study_id, delivery_id=r.id, destination=r.destination,
                status=o.status, attempts=values["attempts"],
            )

    # -- operators ---------------------------------------------------------------------

    def retry(self, ids: Sequence[int] | None = None, now: float | None = None) -> int:
        """Parked -> pending, due now, with a fresh attempt budget; None means every parked row.

        The attempt count restarts because the operator has (presumably)
        fixed the cause: a row that kept its old count would park again on
        the first transient hiccup.
        """
        now = time.time() if now is None else now
        stmt = update(Delivery).where(Delivery.state == PARKED)
        if ids is not None:
            if not ids:
                return 0
            stmt = stmt.where(Delivery.id.in_(list(ids)))
        with self.engine.begin() as c:
            n = len(c.execute(stmt.values(state=PENDING, attempts=0, next_attempt_at=now,
                                          claimed_until=None, claim_token=None).returning(Delivery.id)).all())
        if n:
            self.index.add_event("delivery_requeued", f"operator re-queued {n} parked delivery(ies)",
                                 deliveries=n, ids=None if ids is None else list(ids))
            log.info("operator re-queued %d parked delivery(ies)", n)
        return n

    def status(self, state: str | None = None, study_id: int | None = None) -> list[dict[str, Any]]:
        """Every delivery (optionally of one state or study), oldest first, for ``status`` and the web page.

        Only node-generated identifiers: the rows never held patient data.
        """
        stmt = select(Delivery).order_by(Delivery.id)
        if state is not None:
            stmt = stmt.where(Delivery.state == state)
        if study_id is not None:
            stmt = stmt.where(Delivery.study_id == study_id)
        with self.engine.connect() as c:
            rows = c.execute(stmt).mappings().all()
        return [
            {
                "id": r["id"],
                "study_id": r["study_id"],
                "version_id": r["version_id"],
                "destination": r["destination"],
                "sop_class_uid": r["sop_class_uid"],
                "sop_instance_uid": r["sop_instance_uid"],
                "path": r["path"],
                "state": r["state"],
                "attempts": r["attempts"],
                "next_attempt_at": _iso(r["next_attempt_at"]) if r["state"] == PENDING else None,
                "last_status": r["last_status"],
                "last_error": r["last_error"] or None,
                "created_at": _iso(r["created_at"]),
                "sent_at": _iso(r["sent_at"]),
                # confirmed delivery (docs/dispatch.md): null until sent; a row sent before it existed is unconfirmed
                "confirmation": r["confirmation"] or (UNCONFIRMED if r["state"] == SENT else None),
                "confirm_attempts": r["confirm_attempts"] or 0,
                "confirm_next_at": _iso(r["confirm_next_at"]) if r["confirmation"] == AWAITING else None,
                "confirm_error": r["confirm_error"] or None,
                "confirmed_at": _iso(r["confirmed_at"]),
                "transaction_uid": r["confirm_txn_uid"],
            }
            for r in rows
        ]

    def summary(self) -> dict[str, int]:
        """Counts by state (every state present, zero included) plus ``total``."""
        with self.engine.connect() as c:
            counts = dict(c.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        out = {st: int(counts.get(st, 0)) for st in STATES}
        out["total"] = sum(out.values())
        return out

    def confirmations(self) -> dict[str, int]:
        """Sent rows by confirmation (every value present, zero included); rows sent before 0003 count as unconfirmed.

        Kept apart from ``summary()``, whose keys readers compare as a whole:
        ``sent`` there is every row the PACS took, confirmed or not.
        """
        with self.engine.connect() as c:
            counts = dict(c.execute(select(Delivery.confirmation, func.count()).where(Delivery.state == SENT)
                                    .group_by(Delivery.confirmation)).all())
        out = {st: int(counts.get(st, 0)) for st in CONFIRMATIONS}
        out[UNCONFIRMED] += int(counts.get(None, 0))
        return out

    # -- confirmation --------------------------------------------------------------------

    def _confirm(self, now: float, configured: dict[str, DestinationSettings], result: PumpResult) -> None:
        """Ask each destination to vouch for its due rows (one association per destination and batch).

        Claimed like sends (the same lease columns; a sent row is never claimed
        for sending), so two pumps never ask twice for one row. For storage
        commitment the Transaction UID is written with the claim, before the
        N-ACTION: the PACS may report on a new association to the listener
        (any process on this index) before this pump hears the N-ACTION-RSP.
        """
        started = time.monotonic()
        for name, ids in self._confirm_due(now).items():
            dest = configured.get(name)
            txn = generate_uid() if dest is not None and dest.confirm == COMMITMENT else None
            rows, token = self._claim_confirm(ids, now, txn, dest)
            if not rows:
                continue
            items = [Item(r.id, r.sop_class_uid, r.sop_instance_uid, self.settings.data_path / r.path) for r in rows]
            guard = Delivery.confirm_txn_uid == txn if txn is not None else Delivery.claim_token == token
            try:
                outcomes: dict[int, Confirmation]
                if dest is None:
                    why = Confirmation(Answer.FAILED, f"destination {name} is no longer configured")
                    outcomes = {r.id: why for r in rows}
                elif dest.confirm == NONE:
                    outcomes = {r.id: Confirmation(Answer.OFF, "confirm = none") for r in rows}
                elif dest.confirm == FIND:
                    outcomes = find_instances(dest, items, settings=self.settings)
                else:
                    assert txn is not None
                    asked = request_commitment(dest, items, txn, index=self.index, settings=self.settings)
                    outcomes = {r.id: asked for r in rows}
            except BaseException:
                self._release(token)
                raise
            settled = settle(self.index, self.settings, outcomes, now + (time.monotonic() - started), guard)
            result.confirmed += settled.get(Answer.CONFIRMED, [])
            result.resend += settled.get(Answer.MISSING, [])
            result.confirm_waiting += settled.get(Answer.ASKED, []) + settled.get(Answer.RETRY, [])
            result.unconfirmable += settled.get(Answer.FAILED, []) + settled.get(Answer.OFF, [])
            self._release(token)  # rows a report settled meanwhile, or that a guard skipped, are free again

    def _confirm_due(self, now: float) -> dict[str, list[int]]:
        """Ids of sent rows whose confirmation is due (first ask, report overdue, or retry), per destination."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(Delivery.id, Delivery.destination)
                .where(
                    Delivery.state == SENT,
                    Delivery.confirmation == AWAITING,
                    Delivery.confirm_next_at <= now,
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
                )
                .order_by(Delivery.confirm_next_at, Delivery.id)
                .limit(self.batch_size * max(1, len(self.settings.destinations)) * 4)
            ).all()
        out: dict[str, list[int]] = {}
        for row_id, dest in rows:
            ids = out.setdefault(dest, [])
            if len(ids) < self.batch_size:
                ids.append(row_id)
        return out

    def _claim_confirm(self, ids: list[int], now: float, txn: str | None,
                       dest: DestinationSettings | None) -> tuple[list[_Claimed], str]:
        """Lease the still-due rows of ``ids`` for confirmation (and stamp the N-ACTION's Transaction UID)."""
        token = uuid.uuid4().hex
        lease = self._lease_s(len(ids)) + (5.0 if dest is not None and dest.confirm == COMMITMENT else 0.0)
        # the attempt is counted as it is claimed: a report may settle the row before the N-ACTION-RSP is read
        values: dict[str, Any] = {"claimed_until": now + lease, "claim_token": token,
                                  "confirm_attempts": Delivery.confirm_attempts + 1}
        if txn is not None:
            values["confirm_txn_uid"] = txn
        with self.engine.begin() as c:
            c.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(ids),
                    Delivery.state == SENT,
                    Delivery.confirmation == AWAITING,
                    Delivery.confirm_next_at <= now,
                    or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
                )
                .values(**values)
            )
            rows = c.execute(
                select(
                    Delivery.id, Delivery.study_id, Delivery.destination, Delivery.sop_instance_uid,
                    Delivery.sop_class_uid, Delivery.transfer_syntax_uid, Delivery.path, Delivery.attempts,
                )
                .where(Delivery.claim_token == token)
                .order_by(Delivery.id)
            ).all()
        return [_Claimed(*r) for r in rows], token


def _awaiting_confirmation(dest: DestinationSettings | None, now: float) -> dict[str, Any]:
    """The confirmation columns of a row the destination just took (a re-send starts a fresh confirmation)."""
    fresh: dict[str, Any] = {"confirm_attempts": 0, "confirm_txn_uid": None, "confirm_error": None,
                             "confirmed_at": None}
    if dest is None or dest.confirm == NONE:
        return {**fresh, "confirmation": UNCONFIRMED, "confirm_next_at": None}
    return {**fresh, "confirmation": AWAITING, "confirm_next_at": now + dest.confirm_after_s}


def describe(row: dict[str, Any]) -> str:
    """A delivery's state for operators: ``sent`` is split by confirmation (``dicomnode status``)."""
    state = row.get("state")
    if state != SENT:
        return str(state)
    conf = row.get("confirmation")
    if conf == CONFIRMED:
        return "sent, confirmed"
    if conf == AWAITING:
        n = row.get("confirm_attempts") or 0
        return "sent, awaiting confirmation" + (f" (asked {n}x)" if n else "")
    if conf == FAILED:
        return f"sent, not confirmed: {row.get('confirm_error') or 'unknown'}"
    return "sent (unconfirmed)"


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def outbox(ctx: StageContext) -> Outbox:
    return ctx.memo("outbox", lambda: Outbox(ctx.index, ctx.settings))


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """The dispatch stage: enqueue the version's report objects for every destination; the pump sends them."""
    files = ctx.reports.files(info.version_id)
    if not files:
        return {"queued": 0, "why": "no report for this version"}
    if not ctx.settings.destinations:
        return {"queued": 0, "why": f"{NO_DESTINATIONS}: the report is written but sent nowhere (setting destinations)"}
    box = outbox(ctx)
    n = box.enqueue([ctx.settings.data_path / f for f in files], study_id=info.study_id, version_id=info.version_id)
    if ctx.after_dispatch is not None:
        ctx.after_dispatch()
    else:
        box.pump()
    return {"queued": n, "destinations": [d.name for d in ctx.settings.destinations]}
