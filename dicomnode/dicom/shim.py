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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

from pydicom.filebase import DicomBytesIO
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
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

log = logging.getLogger(__name__)

# How long a reactor with nothing to do waits before it checks its timers
# again. Data, primitives and shutdown wake it at once; only the ARTIM and
# network-idle timers (seconds or more) are checked at this granularity.
POLL_S = 0.05

_configured = False
_configure_lock = threading.Lock()


def configure() -> None:
    """Set pynetdicom's process-wide switches (idempotent; the listener and every sender call it).

    - ``STORE_RECV_CHUNKED_DATASET``: a received dataset is streamed into a
      file in ``tempfile.tempdir`` (the spool's ``tmp``) as its PDUs arrive,
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

    _wake: threading.Event

    def kill(self) -> None:
        self._wake.set()
        super().kill()

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
        if self.message is None:
            message = DIMSEMessage()  # its __init__ keys on the class name "DIMSEMessage"
            message.__class__ = _IncomingMessage
            self.message = message
        super().receive_primitive(primitive)


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
                    if self.command_set.CommandDataSetType == 0x0101:
                        return True
                    if _config.STORE_RECV_CHUNKED_DATASET and isinstance(self, C_STORE_RQ):
                        _open_dataset_file(self, context_id, assoc)  # self is pynetdicom's C_STORE_RQ now
            else:  # data set fragment
                if self._data_set_file:
                    self._data_set_file.write(data[1:])
                    self._data_set_file.file.flush()
                else:
                    self.data_set.write(data[1:])  # type: ignore[union-attr]
                if control & 2:
                    return True
        return False


def _open_dataset_file(message: DIMSEMessage, context_id: int, assoc: Association | None) -> None:
    """The temporary file upstream streams a C-STORE data set into, opened with its preamble and file meta."""
    # delete=False as upstream (Windows cannot reopen an open temporary file); the handler removes it
    # stays open across PDUs and is handed to the request primitive, as upstream does
    message._data_set_file = NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")  # noqa: SIM115
    message._data_set_path = Path(message._data_set_file.name)
    assert assoc is not None
    syntax = assoc._accepted_cx[context_id].transfer_syntax[0]
    sop_class = message.command_set.AffectedSOPClassUID
    sop_instance = message.command_set.AffectedSOPInstanceUID
    meta = _file_meta(str(sop_class), str(sop_instance), str(syntax))
    if meta is None:  # not ASCII: let pydicom encode it, as upstream
        buffer = DicomBytesIO()
        write_file_meta_info(buffer, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                                      transfer_syntax=syntax))
        meta = buffer.getvalue()
    message._data_set_file.write(b"\x00" * 128 + b"DICM" + meta)


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
    a buffer of the PDU's size, as much as has arrived per call.
    """

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
    """

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
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        return assoc


def start_server(ae: AE, address: tuple[str, int], handlers: list[Any],
                 ssl_context: ssl.SSLContext | None) -> ThreadedAssociationServer:
    """``AE.start_server(block=False)`` with :class:`EventRequestHandler`: listening when this returns.

    ``AE.make_server`` is the documented way to pass ``request_handler``; the
    rest is what ``start_server`` does (register the server with the AE,
    whose ``shutdown`` and the server's own look for it there, and serve in a
    daemon thread).
    """
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context,
                            server_class=ThreadedAssociationServer, request_handler=EventRequestHandler)
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    return server
