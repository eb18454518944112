"""The node as a service class user: one association set-up, one context batcher, one C-STORE loop.

The operator CLI (``dicomnode send`` / ``echo``), ``echo --destinations`` and
the outbox (``stages/dispatch``) all send through :func:`associate` and
:func:`store`, so TLS, timeouts, TCP_NODELAY, context negotiation and the
meaning of every answer are written once.

Files are sent as they are on disk (pynetdicom's chunked send, see
:func:`dicomnode.dicom.shim.configure`), in their own transfer syntax: nothing
is decoded or re-encoded on the way out, and a retry sends the same bytes and
the same SOP Instance UID.

Why an association failed matters to the outbox: a PACS that is down or busy
(retry) must be told apart from one that refuses this node or this kind of
object (park). pynetdicom keeps the A-ASSOCIATE-RJ in
``assoc.acceptor.primitive`` but not the socket error, so whether a TCP
connection was ever made is recorded with an ``EVT_CONN_OPEN`` handler.
"""
from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association

from dicomnode.config import ClientTLS, DestinationSettings, Settings
from dicomnode.dicom.shim import EventAE, configure
from dicomnode.dicom.sop import VERIFICATION
from dicomnode.dicom.status import Outcome, Verdict, classify_status

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one association can propose (PS3.8: odd IDs 1..255)


# -- operator-facing values -----------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """A peer as an operator types it (``AET@HOST:PORT``), plain TCP."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT``, the form operators type."""
        aet, sep, hostport = text.rpartition("@")
        host, sep2, port = hostport.rpartition(":")
        if not sep or not sep2 or not aet or not host:
            raise ValueError(f"destination must look like AET@HOST:PORT, got {text!r}")
        return cls(aet, host.strip("[]"), int(port))

    def settings(self) -> DestinationSettings:
        return DestinationSettings(ae_title=self.ae_title, host=self.host, port=self.port)


@dataclass(frozen=True)
class SendResult:
    """One file's result for the CLI."""

    path: Path
    status: int | None  # None: not sent (unreadable file, association failed)
    comment: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0x0000


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for association negotiation, each DIMSE answer, and network silence."""

    acse_s: float
    dimse_s: float
    network_s: float

    @classmethod
    def of(cls, settings: Settings) -> Timeouts:
        return cls(settings.acse_timeout_s, settings.dimse_timeout_s, settings.network_timeout_s)

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        return cls(seconds, seconds, seconds)


@dataclass(frozen=True)
class OutgoingFile:
    """A file to C-STORE as it is; ``ref`` is the caller's (the outbox's delivery id), returned with the outcome."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    ref: int | None = None

    @property
    def context(self) -> tuple[str, str]:
        return (self.sop_class_uid, self.transfer_syntax_uid)


class AssociationFailed(Exception):
    """No association: ``outcome`` says whether waiting can fix it (RETRY) or not (PARK), and why."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


# -- the one association set-up -------------------------------------------------------------


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext | None:
    """A verifying client context, or None for plain TCP.

    ``ca_file`` pins the PACS's CA; without it the system trust store is used,
    never an unverified context: a report sent to an impostor is a leak.
    """
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def no_delay(assoc: Any) -> None:
    """Switch Nagle's algorithm off on an established association's socket.

    pynetdicom writes a C-STORE as several small PDUs; with Nagle on, each
    small write after the first waits for the peer's delayed ACK (~40 ms):
    224 small images took 12.1 s from our SCU to our SCP, 54 ms each.
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket (never in practice): nothing to tune
            pass


@contextmanager
def associate(
    dest: DestinationSettings,
    contexts: Iterable[tuple[str, str]],
    *,
    calling_ae: str,
    timeouts: Timeouts,
    max_pdu: int = 0,
) -> Iterator[Association]:
    """An established association with ``dest``, released on exit; raises :class:`AssociationFailed`.

    One presentation context per (SOP class, transfer syntax), each proposing
    only that transfer syntax: files go out as stored, never transcoded.
    TLS comes from ``dest.tls`` (verifying, see :func:`client_ssl_context`).
    The reactors are the event-driven ones (:mod:`dicomnode.dicom.shim`).
    """
    configure()
    try:
        ctx = client_ssl_context(dest.tls)
    except (OSError, ssl.SSLError) as exc:
        raise AssociationFailed(Outcome(Verdict.PARK, None, f"TLS configuration for {dest.name} unusable: {exc}")) \
            from None
    ae = EventAE(ae_title=calling_ae)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.connection_timeout = timeouts.acse_s
    ae.maximum_pdu_size = max_pdu
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, [transfer_syntax])
    connected: list[bool] = []
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            max_pdu=max_pdu,
            tls_args=(ctx, dest.host) if ctx is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
        )
    except socket.gaierror as exc:
        # pynetdicom resolves the name before it connects and lets the error out. A name that does not
        # resolve may be a DNS outage as well as a typo: retried (and parked after dispatch_max_attempts)
        raise AssociationFailed(Outcome(Verdict.RETRY, None, f"host {dest.host!r} of {dest.name} cannot be "
                                                             f"resolved ({exc.strerror or exc})")) from None
    if not assoc.is_established:
        raise AssociationFailed(association_failure(assoc, dest, bool(connected)))
    no_delay(assoc)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def association_failure(assoc: Association, dest: DestinationSettings, connected: bool) -> Outcome:
    """Classify an association that did not get established (rejection reasons per PS3.8 9.3.4)."""
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        text = f"association rejected by {dest.name}: {rsp.result_str}, {rsp.source_str}, {rsp.reason_str}"
        return Outcome(Verdict.RETRY if rsp.result == 0x02 else Verdict.PARK, None, text)  # 0x02: transient
    if rsp is not None and getattr(rsp, "result", None) == 0x00 and not assoc.accepted_contexts:
        return Outcome(
            Verdict.PARK, None,
            f"{dest.name} accepted the association but none of the proposed SOP class/transfer syntax pairs",
        )
    if not connected:
        return Outcome(
            Verdict.RETRY, None,
            f"could not connect to {dest.name} (refused, unreachable, timed out or TLS handshake failed)",
        )
    if rsp is None:
        return Outcome(Verdict.RETRY, None, f"no association response from {dest.name} "
                                            "(connection closed, e.g. our TLS certificate refused, or ACSE timeout)")
    return Outcome(Verdict.RETRY, None, f"association with {dest.name} aborted")


# -- the one batcher and the one C-STORE loop --------------------------------------------------


def batches(files: Sequence[OutgoingFile]) -> Iterator[list[OutgoingFile]]:
    """Consecutive runs of ``files`` that each need at most MAX_CONTEXTS presentation contexts (order kept)."""
    batch: list[OutgoingFile] = []
    contexts: set[tuple[str, str]] = set()
    for f in files:
        if f.context not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        batch.append(f)
        contexts.add(f.context)
    if batch:
        yield batch


def store(
    dest: DestinationSettings,
    files: Sequence[OutgoingFile],
    *,
    calling_ae: str,
    timeouts: Timeouts,
    max_pdu: int = 0,
) -> Iterator[tuple[OutgoingFile, Outcome]]:
    """C-STORE ``files`` to ``dest``: one outcome per file, in the order given.

    One association per batch (one in practice; more only past MAX_CONTEXTS
    distinct contexts). An association that cannot be made gives every file
    of its batch the classified failure; a context the peer did not accept
    parks its files; an association that ends midway leaves the rest to retry;
    a file pynetdicom cannot send parks that file and the batch goes on.
    """
    for batch in batches(files):
        try:
            with associate(dest, sorted({f.context for f in batch}), calling_ae=calling_ae, timeouts=timeouts,
                           max_pdu=max_pdu) as assoc:
                accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
                for f in batch:
                    yield f, _store_one(assoc, dest, f, accepted)
        except AssociationFailed as failed:
            for f in batch:
                yield f, failed.outcome


def _store_one(assoc: Association, dest: DestinationSettings, f: OutgoingFile,
               accepted: set[tuple[str, str]]) -> Outcome:
    if not assoc.is_established:
        return Outcome(Verdict.RETRY, None, "association ended before this object was sent")
    if f.context not in accepted:
        return Outcome(Verdict.PARK, None, f"{dest.name} did not accept SOP class {f.sop_class_uid} "
                                           f"in transfer syntax {f.transfer_syntax_uid}")
    try:
        rsp = assoc.send_c_store(f.path)
    except Exception as exc:  # a file pynetdicom cannot send must not end the batch
        return Outcome(Verdict.PARK, None, f"cannot send file: {type(exc).__name__}: {exc}")
    status = int(rsp.Status) if "Status" in rsp else None
    comment = str(rsp.get("ErrorComment", "") or "")
    if comment:
        log.debug("C-STORE of %s: peer comment %r", f.path.name, comment)
    return classify_status(status, comment)


# -- the CLI's commands and the destination check ------------------------------------------------


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, and every file under directories named, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(p)
    return out


def send(
    paths: Iterable[str | Path], dest: Destination, calling_ae: str = "DICOMNODE", timeout_s: float = 60.0
) -> list[SendResult]:
    """C-STORE every DICOM file under ``paths``; non-DICOM files are reported, not sent."""
    results: list[SendResult] = []
    files: list[OutgoingFile] = []
    for path in expand(paths):
        try:
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            files.append(OutgoingFile(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception as exc:
            results.append(SendResult(path, None, f"not a DICOM file: {type(exc).__name__}"))
    for f, outcome in store(dest.settings(), files, calling_ae=calling_ae, timeouts=Timeouts.uniform(timeout_s)):
        comment = "" if outcome.status == 0x0000 else outcome.reason
        results.append(SendResult(f.path, outcome.status, comment))
    return results


def _echo_status(assoc: Association) -> int | None:
    rsp = assoc.send_c_echo()
    return int(rsp.Status) if "Status" in rsp else None


VERIFICATION_CONTEXT = (VERIFICATION, str(ImplicitVRLittleEndian))  # the default syntax every peer accepts


def echo(dest: Destination, calling_ae: str = "DICOMNODE", timeout_s: float = 10.0) -> int | None:
    """Verification status of the peer (0 = alive), None when no association was possible."""
    try:
        with associate(dest.settings(), [VERIFICATION_CONTEXT], calling_ae=calling_ae,
                       timeouts=Timeouts.uniform(timeout_s)) as assoc:
            return _echo_status(assoc)
    except AssociationFailed:
        return None


def echo_destinations(settings: Settings) -> list[tuple[str, bool, str]]:
    """C-ECHO every configured destination with the dispatch settings (AE title, TLS, timeouts).

    Uses exactly the association set-up the outbox uses, so a green echo
    means the outbox can reach the peer, TLS and AE titles included.
    """
    out: list[tuple[str, bool, str]] = []
    for dest in settings.destinations:
        try:
            with associate(dest, [VERIFICATION_CONTEXT], calling_ae=settings.ae_title, timeouts=Timeouts.of(settings),
                           max_pdu=settings.max_pdu) as assoc:
                status = _echo_status(assoc)
        except AssociationFailed as failed:
            out.append((dest.name, False, failed.outcome.reason))
            continue
        if status is None:
            out.append((dest.name, False, "no C-ECHO response (DIMSE timeout or association aborted)"))
        else:
            out.append((dest.name, status == 0x0000, f"C-ECHO status 0x{status:04X}"))
    return out
