"""What this node changes in pynetdicom, in one place: its settings, its reactors, and one DIMSE encoder.

Three things live here, because pynetdicom's defaults cost the listener most
of its time per instance (figures from cProfile of ``dicomnode serve``
receiving 200 MR images of 512x512 on a loaded 2-core host; docs/receive.md):

1. :func:`configure` sets pynetdicom's process-wide ``_config`` switches, once,
   each with its reason. Nothing else in the node writes ``_config``.

2. Event-driven reactors (a shim for a known pynetdicom limit). pynetdicom
   3.0 runs two polling loops per association: the DUL thread sleeps 1 ms
   whenever its event queue is empty (``DULServiceProvider.run_reactor``,
   "TODO: try and make this event based"), and the association thread sleeps
   1 ms on every turn before it looks for a decoded DIMSE message
   (``Association._run_reactor``). Every C-STORE crosses both: the last PDU
   of a request waits for the DUL's next turn, the decoded request waits for
   the association's next turn, and the response waits for the DUL again.
   ``time.sleep(0.001)`` is a floor, not a ceiling: on the loaded host it
   returned after 2.7 ms on average (3,515 sleeps while 200 instances
   arrived). Upstream reports: pynetdicom issues #120 and #650, PR #139.

   :class:`EventDUL` and :class:`EventAssociation` keep pynetdicom's loops
   statement for statement but wait instead of sleeping: the DUL blocks in
   ``select`` on the peer's socket and a wake-up socket that every put into
   its queues writes to; the association blocks on an event that the DIMSE
   and ACSE queues set. A turn with nothing to do still ends after
   ``POLL_S`` so timers (ARTIM, network idle) are checked as before. This is
   the patch we would send upstream, as subclasses. :class:`EventSocket`
   reads a PDU in as few ``recv`` calls as the kernel allows.

3. :class:`EventDIMSE` writes two things of the C-STORE hot path straight
   in bytes that pynetdicom builds as pydicom datasets, validates and
   encodes: the plain C-STORE response (a status and no optional elements:
   every Success; pynetdicom encodes it twice, once for the group length:
   1.2 ms of CPU per response) and the file meta of a streamed data set
   (0.9 ms). Anything else goes through pynetdicom's encoders; tests check
   the bytes are identical to pynetdicom's.

They are installed through pynetdicom's extension points: the acceptor
through ``AE.make_server(..., request_handler=...)`` (a documented
``AssociationServer`` argument) and the requestor through :class:`EventAE`,
an ``AE`` whose ``_create_socket`` (the one step of ``AE.associate`` that
receives the new association before it starts) swaps them in. Either way
:func:`event_driven` does the swap, on an association whose threads have
not started.
"""
from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
import uuid
from io import BytesIO
from tempfile import NamedTemporaryFile, gettempdir
from typing import Any

from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID
from pydicom.filewriter import write_file_meta_info
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import _MESSAGE_TYPES, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.utils import make_target
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from dicomnode.dicom.status import MISSING_OR_INVALID_UID
from dicomnode.dicom.stream import Sink, guard_of

log = logging.getLogger(__name__)

# How long a reactor with nothing to do waits before it checks its timers
# again. Data, primitives and shutdown wake it at once; only the ARTIM and
# network-idle timers (seconds or more) are checked at this granularity.
POLL_S = 0.05

# The longest PDU other than P-DATA-TF we read (A-ASSOCIATE-RQ/AC and the
# rest). 128 presentation contexts with a dozen transfer syntaxes each and a
# user identity item stay far under it; a peer announcing more is not
# conforming to anything useful, and reading it would buffer what it claims.
MAX_CONTROL_PDU = 1 << 20


@dataclass(frozen=True)
class ConnectionLimits:
    """The listener's defences against peers that hold slots or memory (docs/receive.md "Slots, timeouts and memory").

    Attached to the listening ``AE`` by :func:`set_limits`; every accepted
    association reads them in :class:`EventRequestHandler`. A requestor (the
    node sending) has none and keeps pynetdicom's timeouts.

    - ``artim_timeout_s``: a connection that has not completed its TLS
      handshake and sent its A-ASSOCIATE-RQ within this is closed (the DUL's
      ARTIM timer, PS3.8 9.1.5, and the socket's read timeout until then).
      Such connections never count against ``max_associations``.
    - ``stall_timeout_s``: once associated, no byte from the peer for this
      long while a DIMSE message (a data set) is partly received, or while a
      PDU is partly read, aborts the association: a healthy sender does not
      pause mid-dataset, and a stalled one holds a slot and a temporary file.
    - ``notify(kind, message)``: an operator event (log line and event row)
      for an association the limits abort.
    """

    artim_timeout_s: float = 5.0
    stall_timeout_s: float = 30.0
    notify: Callable[[str, str], None] | None = None


def set_limits(ae: AE, limits: ConnectionLimits) -> None:
    """Give the associations ``ae`` will accept these :class:`ConnectionLimits` (call before :func:`start_server`)."""
    ae._dicomnode_limits = limits  # type: ignore[attr-defined]


def limits_of(ae: AE) -> ConnectionLimits | None:
    return getattr(ae, "_dicomnode_limits", None)


_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def _peer(assoc: Association) -> str:
    """Calling AE title (once known) and address of the peer, for log lines and events (never PHI)."""
    try:
        calling = str(assoc.requestor.ae_title).strip() if assoc.requestor.primitive is not None else ""
        address = assoc.requestor.address if assoc.is_acceptor else assoc.acceptor.address
    except Exception:  # address info not set yet
        calling, address = "", "?"
    return f"calling AE {calling!r} from {address}" if calling else f"from {address}"

_configured = False
_configure_lock = threading.Lock()


def configure() -> None:
    """Set pynetdicom's process-wide switches (idempotent; the listener and every sender call it).

    - ``STORE_RECV_CHUNKED_DATASET``: a received dataset is streamed into a
      file in the spool's ``tmp`` (the association's guard names it) as its PDUs arrive,
      so the listener's memory does not grow with instance size and the
      handler gets a path, not a decoded dataset (the node never decodes
      pixel data on the way in).
    - ``STORE_SEND_CHUNKED_DATASET``: a file is sent as it is on disk, in its
      own transfer syntax, without decoding: the peer gets the same bytes on
      every retry and a large object costs no memory.
    - ``LOG_HANDLER_LEVEL = "none"`` unless the pynetdicom logger is at DEBUG:
      the standard handlers format every PDU and DIMSE message in the
      association threads (CPU on the hot path) for a logger the node keeps at
      WARNING, and at DEBUG they print dataset contents, patient names
      included. The node logs its own PHI-free lines.
    """
    global _configured
    with _configure_lock:
        if _configured:
            return
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.STORE_SEND_CHUNKED_DATASET = True
        debugging = logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
        _config.LOG_HANDLER_LEVEL = "standard" if debugging else "none"
        _configured = True


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``wake`` after every put, so its consumer can block instead of polling."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EventDUL(DULServiceProvider):
    """pynetdicom's DUL reactor, waiting in ``select`` on the peer socket and a wake-up socket instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Primitives from the service user (our responses, releases) and FSM
        # events from other threads (a socket closed by the user) wake this
        # thread; decoded PDUs for the user wake the association's thread.
        self.to_provider_queue = _WakingQueue(self.wake)
        self.event_queue = _WakingQueue(self.wake)
        self.to_user_queue = _WakingQueue(assoc_wake(assoc))

    def wake(self) -> None:
        """Make the reactor's current or next wait return at once (no-op from the reactor itself)."""
        if threading.current_thread() is self:
            return
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):  # buffer full: already woken; closed: reactor has ended
            pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """Upstream's, with the reactor woken so it sees the kill flag now rather than after ``POLL_S``."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
        return super().stop_dul()

    def _wait(self) -> None:
        """Block until the peer sent data, a queue was filled, or ``POLL_S`` passed."""
        wrapper = self.socket
        sock = getattr(wrapper, "socket", None)
        waitables: list[Any] = [self._wake_r]
        # AssociationSocket keeps its connection state private; an unconnected
        # socket would select readable at once and turn the wait into a spin.
        if sock is not None and getattr(wrapper, "_is_connected", False):
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select cannot see them
            waitables.append(sock)
        try:
            select.select(waitables, [], [], POLL_S)
        except (OSError, ValueError):  # the socket was closed under us: the next turn sees it
            return
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _pdu_limit(self, pdu_type: int) -> int:
        """The longest PDU of this type we read: our advertised maximum for P-DATA-TF, else ``MAX_CONTROL_PDU``."""
        if pdu_type != 0x04:
            return MAX_CONTROL_PDU
        ours = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
        return int(ours.maximum_length or 0) or 0xFFFFFFFF

    def _read_pdu_data(self) -> None:
        """Upstream's ``_read_pdu_data`` (same FSM events), with the announced length checked before anything is read.

        Upstream reads whatever length the 6-byte header announces, in one
        piece, then copies it three times while decoding: a sender that
        ignores our maximum PDU length (or whose PDU is one 512 MiB data set,
        when we advertise none) makes the listener hold gigabytes. A P-DATA-TF
        PDU longer than the maximum we advertised (PS3.8 9.3.1 and D.1: the
        maximum length of the variable field) is a non-conforming peer: the
        association is aborted (A-ABORT, invalid PDU parameter value) and the
        connection closed without reading the body. Other PDUs are capped at
        ``MAX_CONTROL_PDU``. A read that gets no byte for the socket's
        timeout (the limits' ARTIM or stall timeout) ends as a closed
        transport (Evt17), as upstream treats a broken read.
        """
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
        except OSError as exc:  # TimeoutError included: the peer stalled inside a PDU header
            self._lost_transport("a PDU header", exc)
            return
        if len(header) < 6:
            self.event_queue.put("Evt17")  # closed by the peer
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_NAMES:
            log.warning("unknown PDU type 0x%02X %s", pdu_type, _peer(self.assoc))
            self.event_queue.put("Evt19")
            return
        limit = self._pdu_limit(pdu_type)
        if length > limit:
            self._refuse_long_pdu(pdu_type, length, limit)
            return
        try:
            body = sock.recv(length)
        except OSError as exc:
            self._lost_transport(f"a {_PDU_NAMES[pdu_type]} PDU of {length} bytes", exc)
            return
        if len(body) != length:
            log.warning("connection closed inside a %s PDU (%d of %d bytes) %s", _PDU_NAMES[pdu_type], len(body),
                        length, _peer(self.assoc))
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x01:
            self._associated()
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception:
            log.warning("undecodable %s PDU %s", _PDU_NAMES[pdu_type], _peer(self.assoc))
            log.debug("PDU decoding failed", exc_info=True)
            self.event_queue.put("Evt19")
            return
        del body
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _lost_transport(self, what: str, exc: OSError) -> None:
        if isinstance(exc, TimeoutError):
            limits = limits_of(self.assoc.ae) if self.assoc.is_acceptor else None
            raw = getattr(self.socket, "socket", None)
            waited = raw.gettimeout() if raw is not None else None
            message = f"no byte for {waited} s inside {what}: connection closed; {_peer(self.assoc)}"
            log.warning("association stalled: %s", message)
            if limits is not None and limits.notify is not None and self.assoc.requestor.primitive is not None:
                limits.notify("association_aborted", f"stalled peer: {message}")
        else:
            log.info("connection lost inside %s (%s) %s", what, type(exc).__name__, _peer(self.assoc))
        self.event_queue.put("Evt17")

    def _associated(self) -> None:
        """An A-ASSOCIATE-RQ arrived: from now on a read without progress ends after the stall timeout, not ARTIM."""
        limits = limits_of(self.assoc.ae) if self.assoc.is_acceptor else None
        raw = getattr(self.socket, "socket", None)
        if limits is not None and raw is not None:
            try:
                raw.settimeout(limits.stall_timeout_s)
            except OSError:
                pass

    def _refuse_long_pdu(self, pdu_type: int, length: int, limit: int) -> None:
        """A-ABORT (service provider, invalid PDU parameter value) and close: the announced body is never read."""
        message = (f"{_PDU_NAMES[pdu_type]} PDU announces {length} bytes, over the {limit} we accept: "
                   f"A-ABORT sent, connection closed, nothing buffered; {_peer(self.assoc)}")
        log.warning("association aborted: %s", message)
        limits = limits_of(self.assoc.ae) if self.assoc.is_acceptor else None
        if limits is not None and limits.notify is not None:
            try:
                limits.notify("association_aborted", message)
            except Exception:  # recording must not keep the connection open
                log.debug("could not record event", exc_info=True)
        abort = A_ABORT_RQ()
        abort.source = 0x02  # DUL service provider
        abort.reason_diagnostic = 0x06  # invalid PDU parameter value
        sock = self.socket
        assert sock is not None and sock.socket is not None
        try:
            # on the raw socket: the wrapper's send would queue an Evt17 of its own on failure, and close() queues one
            sock.socket.sendall(abort.encode())
        except OSError:
            log.debug("A-ABORT not sent", exc_info=True)
        sock.close()  # queues Evt17: the association gets an A-P-ABORT indication and ends

    def run_reactor(self) -> None:
        """``DULServiceProvider.run_reactor`` with ``_wait`` where it slept; otherwise the same turn."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    # either encode and send one primitive or receive and decode one PDU per turn
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    log.error("Exception in the DUL reactor, aborting association: %s", type(exc).__name__)
                    log.debug("DUL reactor exception", exc_info=True)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    try:
                        self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                    except OSError:  # the peer is gone already: nothing left to tell it
                        log.debug("A-ABORT not sent", exc_info=True)
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait()
                    continue
                self.state_machine.do_action(event)
        finally:
            assoc_wake(self.assoc)()  # the association notices a dead DUL now, not a turn later
            self._wake_r.close()
            self._wake_w.close()


def assoc_wake(assoc: Association) -> Callable[[], None]:
    """The callable that wakes ``assoc``'s reactor (a no-op for a plain pynetdicom association)."""
    event = getattr(assoc, "_wake", None)
    return event.set if event is not None else (lambda: None)


class EventAssociation(Association):
    """pynetdicom's association reactor, waiting on an event set by the DIMSE and ACSE queues instead of sleeping."""

    release_requested = False  # the peer asked for a clean release (set before the response is sent)

    _wake: threading.Event
    _stall_s: float | None = None  # from the listener's ConnectionLimits (EventRequestHandler); None: no check

    def kill(self) -> None:
        self._wake.set()
        super().kill()

    def _stalled(self) -> bool:
        """A DIMSE message is partly received and no byte came for ``_stall_s`` (inside a PDU: the socket timeout)."""
        if not self._stall_s or self.dimse.message is None:
            return False
        last = getattr(self.dul.socket, "last_recv", None)
        return last is not None and time.monotonic() - last > self._stall_s

    def _run_reactor(self) -> None:
        """``Association._run_reactor`` with a wait where it slept 1 ms; otherwise the same turn.

        ``_is_paused`` is True while waiting, so a user thread that pauses the
        reactor to send a request (``send_c_store`` and friends spin on it)
        proceeds at once; the reactor re-checks the checkpoint before it
        touches a queue, exactly as upstream.
        """
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._wake.wait(POLL_S)
            self._wake.clear()  # cleared before the queues are read: a put after this wakes the next wait
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
                self._wake.set()  # more may have arrived while we served: look again before waiting

            if self.is_established and self.acse.is_release_requested():
                # Set before the A-RELEASE-RP goes out: the peer closes its socket on reading it, and the
                # DUL's EVT_CONN_CLOSE can then fire before EVT_RELEASED below; a handler seeing this flag
                # knows the release was clean (upstream has the same order and no flag).
                self.release_requested = True
                self.acse.send_release(is_response=True)
                log.debug("association released by the peer")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers, as upstream
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self._stalled():
                message = (f"no byte for {self._stall_s:g} s (stall_timeout_s) with a DIMSE message partly received: "
                           f"A-ABORT; {_peer(self)}")
                log.warning("association stalled: %s", message)
                limits = limits_of(self.ae)
                if limits is not None and limits.notify is not None:
                    try:
                        limits.notify("association_aborted", f"stalled peer: {message}")
                    except Exception:  # recording must not keep the slot
                        log.debug("could not record event", exc_info=True)
                self.abort()
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class EventDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with two hot-path encodings done straight in bytes (module docstring)."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = _plain_store_response(primitive)
        limit = self.maximum_pdu_size
        if (encoded is None or (limit and len(encoded) + 6 > limit)
                or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))  # command, last fragment
        self.dul.send_pdu(pdata)

    def receive_primitive(self, primitive: P_DATA) -> None:
        """``DIMSEServiceProvider.receive_primitive``, statement for statement, but a request pynetdicom cannot
        turn into a primitive is answered instead of ending in silence.

        Upstream logs "Received an invalid DIMSE message" and queues Evt19; the
        peer of a C-STORE whose Affected SOP Instance UID is longer than 64
        characters then got no response at all and waited out its own timeout,
        and the streamed data set stayed in ``spool/tmp``. Here such a C-STORE
        gets 0xC212 (permanent: the same bytes never pass) on an association
        that goes on, and its file is removed.
        """
        if self.message is None:
            message = DIMSEMessage()  # its __init__ keys on the class name "DIMSEMessage"
            message.__class__ = _IncomingMessage
            self.message = message
        if not self.message.decode_msg(primitive, self.assoc):
            return
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": self.message})
        context_id = int(self.message.context_id)  # type: ignore[arg-type]
        try:
            d_primitive = self.message.message_to_primitive()
        except Exception as exc:
            self._invalid_message(self.message, context_id, exc)
            self._reset_message()
            return
        if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[int(d_primitive.MessageIDBeingRespondedTo)] = d_primitive  # type: ignore[arg-type]
        elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
            # handled at once, as upstream: it would block the DUL otherwise
            threading.Thread(target=make_target(self.assoc._serve_request), args=(d_primitive, context_id)).start()
        else:
            self.msg_queue.put((context_id, d_primitive))
        self._reset_message()

    def _reset_message(self) -> None:
        """Upstream's reset after each message (its issue #41: a memory leak otherwise)."""
        assert self.message is not None
        self.message.encoded_command_set = BytesIO()
        self.message.data_set = BytesIO()
        self.message._data_set_file = None
        self.message._data_set_path = None
        self.message = None

    def _invalid_message(self, message: DIMSEMessage, context_id: int, exc: Exception) -> None:
        """Answer a C-STORE-RQ whose command set does not make a valid request; anything else as upstream."""
        guard = guard_of(self.assoc)
        path = message._data_set_path
        if isinstance(path, Path):
            if guard is not None:
                guard.forget(path)
            else:
                _close_quietly(message._data_set_file)
                path.unlink(missing_ok=True)
        cs = message.command_set
        message_id = cs.get("MessageID") if cs is not None else None
        if not isinstance(message, C_STORE_RQ) or not isinstance(message_id, int):
            log.warning("invalid DIMSE message (%s): aborting the association", type(exc).__name__)
            self.dul.event_queue.put("Evt19")
            return
        why = _invalid_command_reason(cs)
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.Status = MISSING_OR_INVALID_UID
        rsp.ErrorComment = why[:64]
        self.send_msg(rsp, context_id)
        if guard is not None:
            guard.refused(MISSING_OR_INVALID_UID, why)
        else:
            log.warning("C-STORE refused (0x%04X): %s", MISSING_OR_INVALID_UID, why)


class _IncomingMessage(DIMSEMessage):
    """A DIMSE message being received: ``DIMSEMessage.decode_msg`` with the streamed C-STORE file meta in bytes.

    Upstream, when the command set of a C-STORE-RQ is complete and
    ``STORE_RECV_CHUNKED_DATASET`` is on, the file meta is built as a pydicom
    dataset and written through pydicom (0.9 ms of CPU per instance, the
    largest single cost in the DUL thread). Here it is written from bytes
    (:func:`_file_meta`, byte-identical, tested). Everything else is
    upstream's logic, statement for statement; once the command set is
    decoded this object takes pynetdicom's own message class, so the data set
    fragments that follow go through upstream's method.
    """

    def decode_msg(self, primitive: P_DATA, assoc: Association | None = None) -> bool:
        if primitive.__class__ != P_DATA or primitive is None:
            return False
        for context_id, data in primitive.presentation_data_value_list:
            control = data[0]
            if control & 1:  # command set fragment
                self.encoded_command_set.write(data[1:])
                if control & 2:  # the last one
                    self.context_id = context_id
                    self.command_set = decode(self.encoded_command_set, True, True)
                    self.__class__ = _MESSAGE_TYPES[int(self.command_set.CommandField)][1]
                    if self.__class__ is C_STORE_RQ:
                        self.__class__ = _StreamedStoreRQ  # its data set fragments go through the guard too
                    if self.command_set.CommandDataSetType == 0x0101:
                        return True
                    if _config.STORE_RECV_CHUNKED_DATASET and isinstance(self, C_STORE_RQ):
                        _open_dataset_file(self, context_id, assoc)  # self is pynetdicom's C_STORE_RQ now
            else:  # data set fragment
                guard = guard_of(assoc)
                if self._data_set_file and guard is not None and self._data_set_path is not None:
                    # a full disk or a passed watermark turns the file into a sink here (dicom/stream.py)
                    guard.write(self._data_set_path, data[1:])
                    self._data_set_file = guard.file_of(self._data_set_path) or self._data_set_file
                elif self._data_set_file:
                    self._data_set_file.write(data[1:])
                    self._data_set_file.file.flush()
                else:
                    self.data_set.write(data[1:])  # type: ignore[union-attr]
                if control & 2:
                    return True
        return False


class _StreamedStoreRQ(C_STORE_RQ):
    """pynetdicom's C-STORE-RQ message, whose data set fragments are written through the association's guard.

    Upstream writes each fragment straight into the temporary file in the DUL
    thread, where a full disk raised ENOSPC and ended the association with no
    status (dicom/stream.py).
    """

    decode_msg = _IncomingMessage.decode_msg


# pynetdicom maps a message to its primitive (and data set keyword) by the class name
_StreamedStoreRQ.__name__ = "C_STORE_RQ"


def _open_dataset_file(message: DIMSEMessage, context_id: int, assoc: Association | None) -> None:
    """The temporary file upstream streams a C-STORE data set into, opened with its preamble and file meta."""
    # delete=False as upstream (Windows cannot reopen an open temporary file); the handler removes it
    # stays open across PDUs and is handed to the request primitive, as upstream does
    assert assoc is not None
    guard = guard_of(assoc)
    try:
        message._data_set_file = NamedTemporaryFile(  # noqa: SIM115
            delete=False, mode="wb", suffix=".dcm", dir=guard.tmp_dir if guard is not None else None)
    except OSError:
        if guard is None:
            raise
        # not even an empty file fits: the data set is read into a sink and answered 0xA700
        sink = Sink(str(Path(guard.tmp_dir or gettempdir()) / f"unwritable-{uuid.uuid4().hex}.dcm"))
        message._data_set_path = Path(sink.name)
        message._data_set_file = guard.opened(message._data_set_path, sink)
        guard.mark_failed(message._data_set_path, "node cannot create a file in its spool")
        return
    message._data_set_path = Path(message._data_set_file.name)
    if guard is not None:
        message._data_set_file = guard.opened(message._data_set_path, message._data_set_file)
    syntax = assoc._accepted_cx[context_id].transfer_syntax[0]
    sop_class = message.command_set.AffectedSOPClassUID
    sop_instance = message.command_set.AffectedSOPInstanceUID
    meta = _file_meta(str(sop_class), str(sop_instance), str(syntax))
    if meta is None:  # not ASCII: let pydicom encode it, as upstream
        buffer = DicomBytesIO()
        write_file_meta_info(buffer, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                                      transfer_syntax=syntax))
        meta = buffer.getvalue()
    head = b"\x00" * 128 + b"DICM" + meta
    if guard is not None:
        guard.write(message._data_set_path, head)
        message._data_set_file = guard.file_of(message._data_set_path) or message._data_set_file
    else:
        message._data_set_file.write(head)


def _invalid_command_reason(cs: Any) -> str:
    """Which UID of a C-STORE command set is unusable, and how (lengths only: never the value itself)."""
    for keyword in ("AffectedSOPInstanceUID", "AffectedSOPClassUID"):
        value = cs.get(keyword)
        text = str(value) if value is not None else ""
        if not text:
            return f"{keyword} missing in the C-STORE request"
        if len(text) > 64:
            return f"{keyword} in the C-STORE request is {len(text)} characters (at most 64)"
        if not UID(text).is_valid:
            return f"{keyword} in the C-STORE request is not a valid UID"
    return "invalid C-STORE request command set"


def _close_quietly(file: Any) -> None:
    try:
        if file is not None:
            file.close()
    except OSError:
        pass


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element in explicit VR little endian, short or long length form by VR (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<HI", 0, len(value)) + value
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes | None:
    """The File Meta Information group pynetdicom writes for a received instance (PS3.10 7.1), or None if not ASCII."""
    try:
        version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
        body = b"".join((
            _explicit(0x00020001, b"OB", b"\x00\x01"),
            _explicit(0x00020002, b"UI", _uid(sop_class)),
            _explicit(0x00020003, b"UI", _uid(sop_instance)),
            _explicit(0x00020010, b"UI", _uid(transfer_syntax)),
            _explicit(0x00020012, b"UI", _uid(str(PYNETDICOM_IMPLEMENTATION_UID))),
            _explicit(0x00020013, b"SH", version + b" " if len(version) % 2 else version),
        ))
    except (UnicodeEncodeError, struct.error):
        return None
    return _explicit(0x00020000, b"UL", struct.pack("<I", len(body))) + body


def _element(tag: int, value: bytes) -> bytes:
    """One command-set element in implicit VR little endian (PS3.5 7.1.3)."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _plain_store_response(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2) of a response with no optional elements, else None."""
    if (type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None or primitive.Status is None
            or primitive.OffendingElement is not None or primitive.ErrorComment is not None):
        return None
    try:
        body = b"".join(
            part for part in (
                _element(0x00000002, _uid(str(primitive.AffectedSOPClassUID)))
                if primitive.AffectedSOPClassUID is not None else b"",
                _element(0x00000100, struct.pack("<H", 0x8001)),  # CommandField: C-STORE-RSP
                _element(0x00000120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
                _element(0x00000800, struct.pack("<H", 0x0101)),  # CommandDataSetType: no data set
                _element(0x00000900, struct.pack("<H", primitive.Status)),
                _element(0x00001000, _uid(str(primitive.AffectedSOPInstanceUID)))
                if primitive.AffectedSOPInstanceUID is not None else b"",
            ) if part
        )
    except (UnicodeEncodeError, struct.error):
        return None  # not ASCII, or a number out of range: pynetdicom's encoder decides
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def event_driven(assoc: Association) -> Association:
    """Give a not-yet-started association the event-driven reactors (see the module docstring).

    The association's class is switched in place (pynetdicom switches its
    DIMSE message classes the same way) and it gets a fresh, unstarted
    :class:`EventDUL` holding the same socket and a fresh :class:`EventDIMSE`. The timeouts are assigned again
    because their setters configure the DUL's timers.
    """
    if assoc.is_alive() or assoc.dul.is_alive():
        raise RuntimeError("event_driven() needs an association whose threads have not started")
    sock = assoc.dul.socket
    assoc.__class__ = EventAssociation
    assoc._wake = threading.Event()  # type: ignore[attr-defined]
    assoc.dul = EventDUL(assoc)
    assoc.dul.socket = sock
    assoc.dimse = EventDIMSE(assoc)
    assoc.dimse.msg_queue = _WakingQueue(assoc._wake.set)  # type: ignore[attr-defined]
    assoc.acse_timeout = assoc.acse_timeout
    assoc.network_timeout = assoc.network_timeout
    return assoc


class EventSocket(AssociationSocket):
    """pynetdicom's socket wrapper, reading a PDU with as few ``recv`` calls as the kernel allows.

    Upstream reads at most 4 KiB per call into a growing ``bytearray``: 128
    calls (and as many GIL hand-overs) for one 512 KiB image. This reads into
    a buffer of the PDU's size, as much as has arrived per call. The DUL
    checks the announced size against our maximum before it asks
    (:meth:`EventDUL._read_pdu_data`), so the buffer is bounded.

    ``last_recv`` (monotonic seconds) is when the last byte arrived: the
    association's stall check reads it, so a PDU that trickles in over a
    slow link is progress, not a stall.
    """

    last_recv: float = 0.0

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:  # connection closed: return what arrived, as upstream does
                del view
                del buf[got:]
                return buf
            got += n
            self.last_recv = time.monotonic()
        return buf


class EventAE(AE):
    """An ``AE`` whose requested associations run the event-driven reactors (and :class:`EventSocket`)."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        event_driven(assoc)
        sock = EventSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


class EventRequestHandler(RequestHandler):
    """The acceptor's per-connection handler: pynetdicom's, with event-driven reactors.

    Also shares the server's supported contexts instead of deep-copying them
    per association: pynetdicom's acceptor negotiation only reads them
    (``presentation.negotiate_as_acceptor`` builds new context objects), and
    deep-copying every storage SOP class with every transfer syntax cost
    about a second of CPU per association under cProfile on a loaded host.

    With the listener's :class:`ConnectionLimits`: the TLS handshake happens here, in
    the connection's own thread, under the ARTIM timeout (upstream does it in
    ``accept``, in the one thread that accepts every connection: a client
    that connects and never says hello would stop the listener); the socket
    reads time out after ``artim_timeout_s`` until the A-ASSOCIATE-RQ is in
    (then ``stall_timeout_s``, set by :class:`EventDUL`), and the association
    waits ``artim_timeout_s`` for that request (ARTIM) instead of the ACSE
    timeout.
    """

    def handle(self) -> None:
        limits = limits_of(self.ae)
        sock = self.request
        assert isinstance(sock, socket.socket)
        if isinstance(sock, ssl.SSLSocket):  # EventServer left the handshake to us
            sock.settimeout(limits.artim_timeout_s if limits is not None else self.ae.acse_timeout)
            try:
                sock.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                log.info("TLS handshake from %s failed (%s): connection closed", self.client_address[0],
                         type(exc).__name__)
                self.server.shutdown_request(sock)
                return
            sock.settimeout(None)
        if limits is not None:
            sock.settimeout(limits.artim_timeout_s)
        super().handle()

    def _create_association(self) -> Association:
        assoc = event_driven(Association(self.ae, "acceptor"))
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        # after the swap: the socket wrapper queues "connection open" (Evt5) on the DUL it finds
        assoc.set_socket(EventSocket(assoc, client_socket=self.request))  # type: ignore[arg-type]
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = list(self.server.contexts)
        assoc.requestor.address_info = self.remote
        limits = limits_of(self.ae)
        if limits is not None:
            assoc.acse_timeout = limits.artim_timeout_s  # the wait for the A-ASSOCIATE-RQ, and the DUL's ARTIM
            assoc._stall_s = limits.stall_timeout_s  # type: ignore[attr-defined]
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        return assoc


class EventServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, leaving the TLS handshake to the connection's thread.

    Upstream wraps the accepted socket with ``do_handshake_on_connect`` in
    ``get_request``, in the single thread that accepts every connection, on a
    socket without a timeout: one client that connects and sends nothing
    would hold the whole listener. :meth:`EventRequestHandler.handle` does
    the handshake under the ARTIM timeout instead.

    The listen backlog is 128 instead of ``socketserver``'s 5: connections
    that arrive together (a burst of idle ones included) past the backlog
    wait for the client's SYN retransmission, 1 s and then 3 s, before the
    listener even sees them.
    """

    request_queue_size = 128

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


def start_server(ae: AE, address: tuple[str, int], handlers: list[Any],
                 ssl_context: ssl.SSLContext | None) -> ThreadedAssociationServer:
    """``AE.start_server(block=False)`` with :class:`EventRequestHandler`: listening when this returns.

    ``AE.make_server`` is the documented way to pass ``request_handler``; the
    rest is what ``start_server`` does (register the server with the AE,
    whose ``shutdown`` and the server's own look for it there, and serve in a
    daemon thread). Without :class:`ConnectionLimits` on ``ae`` (:func:`set_limits`)
    the sockets keep pynetdicom's behaviour (no read timeout before the
    A-ASSOCIATE-RQ but the ACSE timeout, and no stall check).
    """
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context,
                            server_class=EventServer, request_handler=EventRequestHandler)
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    return server
