"""Associations with the node's destinations: TLS, timeouts, and why an association failed.

The outbox needs more than "it did not work": a PACS that is down or busy
(retry) must be told apart from one that refuses this node or this kind of
object (park). pynetdicom keeps the A-ASSOCIATE-RJ in ``assoc.acceptor.primitive``
but not the socket error, so whether a TCP connection was ever made is
recorded with an ``EVT_CONN_OPEN`` handler.
"""
from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from dicomnode.config import ClientTLS, DestinationSettings, Settings
from dicomnode.dicom.scu import no_delay
from dicomnode.dicom.status import Outcome, Verdict

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation contexts one association can propose (PS3.8: odd IDs 1..255)


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


def open_association(
    settings: Settings, dest: DestinationSettings, contexts: Iterable[tuple[str, str]]
) -> tuple[Association | None, Outcome | None]:
    """Associate with ``dest`` proposing one context per (SOP class, transfer syntax).

    Each context proposes only the given transfer syntax: files are sent as
    stored, never transcoded, so the peer receives the same bytes on every
    retry. Returns the established association, or None and the failure.
    """
    try:
        ctx = client_ssl_context(dest.tls)
    except (OSError, ssl.SSLError) as exc:
        return None, Outcome(Verdict.PARK, None, f"TLS configuration for {dest.name} unusable: {exc}")
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.connection_timeout = settings.acse_timeout_s
    ae.maximum_pdu_size = settings.max_pdu
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, [transfer_syntax])
    connected: list[bool] = []
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        max_pdu=settings.max_pdu,
        tls_args=(ctx, dest.host) if ctx is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
    )
    if assoc.is_established:
        no_delay(assoc)
        return assoc, None
    return None, association_failure(assoc, dest, bool(connected))


def association_failure(assoc: Association, dest: DestinationSettings, connected: bool) -> Outcome:
    """Classify an association that did not get established."""
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        text = f"association rejected by {dest.name}: {rsp.result_str}, {rsp.source_str}, {rsp.reason_str}"
        return Outcome(Verdict.RETRY if rsp.result == 0x02 else Verdict.PARK, None, text)
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
        return Outcome(Verdict.RETRY, None, f"no association response from {dest.name} (connection closed, e.g. our TLS certificate refused, or ACSE timeout)")
    return Outcome(Verdict.RETRY, None, f"association with {dest.name} aborted")


def echo_destinations(settings: Settings) -> list[tuple[str, bool, str]]:
    """C-ECHO every configured destination with the dispatch settings (AE title, TLS, timeouts).

    Uses exactly the association set-up the outbox uses, so a green echo
    means the outbox can reach the peer, TLS and AE titles included.
    """
    out: list[tuple[str, bool, str]] = []
    for dest in settings.destinations:
        assoc, failure = open_association(settings, dest, [(Verification, "1.2.840.10008.1.2")])
        if assoc is None:
            assert failure is not None
            out.append((dest.name, False, failure.reason))
            continue
        try:
            rsp = assoc.send_c_echo()
            status = int(rsp.Status) if "Status" in rsp else None
        finally:
            if assoc.is_established:
                assoc.release()
        if status is None:
            out.append((dest.name, False, "no C-ECHO response (DIMSE timeout or association aborted)"))
        else:
            out.append((dest.name, status == 0x0000, f"C-ECHO status 0x{status:04X}"))
    return out
