"""The PACS-facing edge: a pynetdicom Storage and Verification SCP.

Handlers here do the minimum an acknowledgement needs and nothing more: check
the peer, check the dataset is understandable, make it durable (the spool's
fdatasync, then the index row committed) and return a status. Assembly,
identification and everything heavier run elsewhere; a clean release only
nudges the assembler.

Success (0x0000) is sent only after the handler returns (pynetdicom sends the
C-STORE response after ``EVT_C_STORE``), so an acknowledged instance is on disk
and in the index. Which failure gets which status follows the transient /
permanent rule in :mod:`dicomnode.dicom.status`.

Speed (docs/receive.md has the figures): the associations run pynetdicom's
reactors made event-driven (:mod:`dicomnode.dicom.shim`); the spool makes an
instance durable with one fdatasync; the index is asked "is this ours?" only
for the SOP classes the node sends, and "is this a duplicate?" only when the
insert says so; index writes from concurrent associations take turns on a
lock in this process instead of meeting in SQLite's busy handler, which
sleeps (1, 2, 5, 10 ms ...) between its retries.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.valuerep import VR
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from sqlalchemy.exc import IntegrityError, OperationalError

from dicomnode.config import Peer, Settings
from dicomnode.dicom.commit import add_commitment_context, commitment_handlers
from dicomnode.dicom.shim import ConnectionLimits, configure, set_limits, start_server
from dicomnode.dicom.sop import GRADABLE_SOP_CLASSES, SENT_SOP_CLASSES, VERIFICATION
from dicomnode.dicom.status import (
    CANNOT_UNDERSTAND,
    COMMAND_DATASET_MISMATCH,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    MISSING_OR_INVALID_UID,
    OUT_OF_RESOURCES,
    PIXEL_DATA_TRUNCATED,
    SERIES_IN_OTHER_STUDY,
    SUCCESS,
    TRANSFER_SYNTAX_MISMATCH,
)
from dicomnode.dicom.stream import ReceiveGuard, attach, guard_of
from dicomnode.index.studies import Index, InstanceMeta, StoreOutcome, UidConflict
from dicomnode.logs import uid_tag
from dicomnode.spool import Spool

log = logging.getLogger(__name__)

# The acceptor's order decides which proposed syntax is taken (pynetdicom).
# Explicit VR first (keeps VRs of private tags), then every compressed and
# other syntax so a PACS can send what it holds unchanged, implicit VR last.
PREFERRED_TRANSFER_SYNTAXES = [str(ExplicitVRLittleEndian)] + [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
] + [str(ImplicitVRLittleEndian)]

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData


class Refused(Exception):
    """A dataset we will not store; carries the DIMSE status and a short comment for the sender."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class ListenError(OSError):
    """The listener cannot have its address; ``str()`` is one line for the operator, naming the setting.

    An OSError still (with the ``errno`` of the cause), so callers that catch
    OSError at start-up keep working; only the wording is the node's.
    """

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.errno = errno_


def listen_problem(exc: OSError, host: str, port: int) -> str:
    """Why the listener could not bind ``host:port``, in the operator's terms (the settings, not the errno)."""
    if isinstance(exc, socket.gaierror):
        return f"host {host!r} cannot be resolved ({exc.strerror}) (setting host / DICOMNODE_HOST)"
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (setting port / DICOMNODE_PORT)"
    if exc.errno == errno.EACCES:
        return (f"port {port} on {host} needs privileges this process lacks (ports under 1024 need root or "
                f"CAP_NET_BIND_SERVICE; the DICOM default is 11112) (setting port / DICOMNODE_PORT)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"host {host} is not an address of this machine (setting host / DICOMNODE_HOST)"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc} (settings host, port)"


def valid_uid(value: Any) -> bool:
    """A DICOM UID: digits and dots, no leading zeros in components, at most 64 characters."""
    return isinstance(value, str) and UID(value).is_valid


def inspect_received(path: Path, command_sop_class: str, command_sop_instance: str, transfer_syntax: str) -> InstanceMeta:
    """Read a received file far enough to index it and to know every later reader can, refusing what cannot be.

    Large values (pixel data) are not read (``defer_size``); their declared
    extent is checked against the file size so a truncated dataset is refused
    rather than acknowledged. Every other public element is decoded once
    (:func:`_check_values`): an instance the node acknowledges is one its own
    pipeline can read. Any exception pydicom raises on the way is a refusal
    with a status, never an exception for pynetdicom to answer (0xC211 and a
    traceback, which the fuzzer found: tests/test_fuzz_receive.py).
    """
    try:
        return _inspect(path, command_sop_class, command_sop_instance, transfer_syntax)
    except Refused:
        raise
    except Exception as exc:  # pydicom raises many types on garbage; none may reach pynetdicom
        raise Refused(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from exc


def _inspect(path: Path, command_sop_class: str, command_sop_instance: str, transfer_syntax: str) -> InstanceMeta:
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            ds = _read_received(fh, transfer_syntax)
            end = fh.tell()
        # Every element is walked (the end-of-parse check below); only these
        # few are decoded, the UIDs and code strings straight from their bytes.
        sop_instance = _ascii(ds, 0x00080018)
        sop_class = _ascii(ds, 0x00080016)
        study_uid = _ascii(ds, 0x0020000D)
        series_uid = _ascii(ds, 0x0020000E)
        modality = _ascii(ds, 0x00080060)
        series_number = _ascii(ds, 0x00200011)
        description = ds.get("SeriesDescription")  # LO: the dataset's character set applies
    except Exception as exc:  # pydicom raises many types on garbage; none may reach pynetdicom
        raise Refused(CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from exc
    _check_encoding(ds, transfer_syntax)
    _check_values(ds)
    if end != size:
        # The parse must end exactly at the end of the file. Short: pydicom
        # dropped an undefined-length element it found no end of (encapsulated
        # pixel data, a sequence) with only a warning. Long: a deferred value
        # (native pixel data) was declared longer than what arrived.
        raise Refused(PIXEL_DATA_TRUNCATED, "dataset truncated")
    for name, value in (
        ("SOPInstanceUID", sop_instance),
        ("SOPClassUID", sop_class),
        ("StudyInstanceUID", study_uid),
        ("SeriesInstanceUID", series_uid),
    ):
        if not valid_uid(value):
            raise Refused(MISSING_OR_INVALID_UID, f"missing or invalid {name}")
    assert sop_instance is not None and sop_class is not None and study_uid is not None and series_uid is not None
    if sop_instance != command_sop_instance.strip("\0 "):
        raise Refused(COMMAND_DATASET_MISMATCH, "SOPInstanceUID differs from the C-STORE request")
    if sop_class != command_sop_class.strip("\0 "):
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the C-STORE request")
    is_image_class = sop_class in GRADABLE_SOP_CLASSES or "Image" in UID(sop_class).name
    pixel = next((ds.get_item(t, keep_deferred=True) for t in _PIXEL_TAGS if t in ds), None)
    if is_image_class and pixel is None:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, "image SOP class without pixel data")
    if pixel is not None:
        _check_pixel_length(ds, pixel)
    try:
        number = int(series_number) if series_number else None
    except ValueError:
        number = None
    return InstanceMeta(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        modality=modality or None,
        series_number=number,
        series_description=str(description) if description else None,
        gradable=sop_class in GRADABLE_SOP_CLASSES and modality == "MR",
    )


# What pynetdicom writes before the dataset it streams to disk: preamble, "DICM",
# then the File Meta Information group, which opens with its explicit VR group length.
_META_START = b"DICM" + b"\x02\x00\x00\x00UL\x04\x00"


def _read_received(fh: BinaryIO, transfer_syntax: str) -> Dataset:
    """The dataset of a file pynetdicom wrote, without re-parsing the meta group pynetdicom itself wrote.

    pynetdicom writes the file meta from the negotiated context, so the
    transfer syntax is known; parsing (and validating) that group again was
    about 0.4 ms of CPU per instance, a third of this function. Anything
    else (a deflated syntax, a file of another layout) goes through dcmread.
    """
    syntax = UID(transfer_syntax)
    head = fh.read(144)
    if syntax.is_deflated or len(head) < 144 or head[128:140] != _META_START:
        fh.seek(0)
        # deflated: read whole (no deferred values), since the end-of-parse check then measures the compressed
        # file and cannot tell a deferred value that ran past the end of the inflated data
        return dcmread(fh, defer_size=None if syntax.is_deflated else 4096)
    fh.seek(144 + int.from_bytes(head[140:144], "little"))
    return read_dataset(fh, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=4096)


def _check_encoding(ds: Dataset, transfer_syntax: str) -> None:
    """Refuse a data set that is not encoded in the transfer syntax it was sent under.

    pydicom reads such a data set anyway: it looks at the first element and
    silently switches between implicit and explicit VR. The listener would
    then acknowledge an object that every later reader, told the file's
    transfer syntax, misreads (the fuzzed study that failed its report step).
    Only the top-level encoding is compared: an implicit-VR sequence inside
    an explicit-VR data set is a known writer quirk pydicom reads correctly.
    """
    try:
        syntax = UID(transfer_syntax)
        expected = (syntax.is_implicit_VR, syntax.is_little_endian)
    except ValueError:  # not a transfer syntax pydicom knows: nothing to compare against
        return
    found = ds.original_encoding
    if found[0] is None or tuple(found) == expected:
        return
    raise Refused(TRANSFER_SYNTAX_MISMATCH,
                  f"encoded {_encoding(*found)}, transfer syntax says {_encoding(*expected)}")


def _encoding(implicit: bool | None, little: bool | None) -> str:
    return f"{'implicit' if implicit else 'explicit'} VR {'LE' if little else 'BE'}"


def _check_values(ds: Dataset) -> None:
    """Every element arrived whole and can be read: public ones decode, private ones are well formed.

    pydicom takes a short read of a value it does not defer without a word:
    a data set cut inside its last element then parses to exactly the end of
    the file and passed the end-of-parse check. And a value pydicom cannot
    decode (an unknown VR, a length that is no multiple of its VR's size, an
    ambiguous VR with nothing to resolve it, garbage in a sequence) passed
    too, to fail later in the pipeline after the PACS was told Success (all
    found by the fuzzer, tests/test_fuzz_receive.py).

    Cost, measured on the 543 real vendor files of ../shared/data/real (CPU
    per file, loaded host): no check 1.5-1.8 ms, this 3.6-4.8 ms, decoding
    the private elements too 6.1-6.2 ms. Private elements are therefore only
    checked for form (a known VR, a length that fits it; their sequences are
    walked like public ones): the node reads none it cannot do without. Large
    values (deferred, pixel data among them) are neither read nor decoded;
    their extent is what the end-of-parse check covers.
    """
    for tag in list(ds.keys()):
        if tag.group == 0xFFFE:  # an item or delimiter where an element belongs: no reader can decode it
            raise Refused(CANNOT_UNDERSTAND, "item delimiter outside a sequence")
        raw = ds._dict[tag]
        if isinstance(raw, RawDataElement):
            if raw.VR is not None and raw.VR not in _KNOWN_VRS:
                raise Refused(CANNOT_UNDERSTAND, "element with an unknown value representation")
            if raw.value is None:  # deferred: a large value, not read
                continue
            if raw.length != 0xFFFFFFFF and len(raw.value) != raw.length:
                raise Refused(PIXEL_DATA_TRUNCATED, "dataset truncated inside an element")
            if tag in _PIXEL_TAGS:
                continue
            if tag.is_private and raw.VR != "SQ":
                size = _FIXED_SIZE.get(raw.VR or "")
                if size and len(raw.value) % size:
                    raise Refused(CANNOT_UNDERSTAND, "element length does not fit its value representation")
                continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                _check_values(item)


_KNOWN_VRS = frozenset(vr.value for vr in VR)
_FIXED_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8, "UV": 8, "OW": 2, "OF": 4,
               "OD": 8, "OL": 4, "OV": 8}


def _ascii(ds: Dataset, tag: int) -> str | None:
    """An ASCII-only value (UI, CS, IS) from its bytes, trailing padding removed; None when absent or empty."""
    item = ds.get_item(tag)
    if item is None or item.value is None:
        return None
    value = item.value
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip("\0 ") or None


def _check_pixel_length(ds: Dataset, elem: Any) -> None:
    """Refuse native pixel data shorter than the image it claims to be.

    (Data running past the end of the file is caught by the end-of-parse check.)
    """
    length = getattr(elem, "length", None)
    if length is None or length == 0xFFFFFFFF or elem.tag != 0x7FE00010:
        return  # encapsulated, or float pixel data: no simple expected length
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, "pixel data without a valid image description") from None
    if length < (rows * cols * spp * frames * bits + 7) // 8:
        raise Refused(PIXEL_DATA_TRUNCATED, "pixel data shorter than Rows x Columns x frames")


@dataclass(frozen=True)
class _AllowRule:
    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None  # None: any host


def _compile_peers(peers: tuple[Peer, ...]) -> list[_AllowRule]:
    """Resolve host bindings once at start-up (IP, CIDR or host name)."""
    rules = []
    for p in peers:
        if p.host is None:
            rules.append(_AllowRule(p.ae_title, None))
            continue
        try:
            nets: tuple[Any, ...] = (ipaddress.ip_network(p.host, strict=False),)
        except ValueError:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(p.host, None)}
            nets = tuple(ipaddress.ip_network(a) for a in sorted(addrs))
        rules.append(_AllowRule(p.ae_title, nets))
    return rules


def _peer_allowed(rules: list[_AllowRule], calling: str, address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    for r in rules:
        if r.ae_title != calling:
            continue
        if r.networks is None or (ip is not None and any(ip in n for n in r.networks)):
            return True
    return False


class StorageSCP:
    """Owns the AE and its handlers; ``start`` returns once the port is listening."""

    def __init__(self, settings: Settings, index: Index, spool: Spool, on_release: Callable[[], None] | None = None):
        self.settings = settings
        self.index = index
        self.spool = spool
        self.on_release = on_release
        self._rules = _compile_peers(settings.allowed_peers)
        self._touched: dict[int, set[int]] = {}
        self._lock = threading.Lock()  # guards _touched
        self._index_writes = threading.Lock()  # one index writer at a time from this process (see module docstring)
        self.server: Any = None

    def build_ae(self) -> AE:
        """The listening AE. Slots are counted by ``_on_requested`` (only associations past their
        A-ASSOCIATE-RQ, per peer and in total); pynetdicom's own count, which includes every connection
        still waiting to send its request, is switched off by an unreachable maximum."""
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = 1 << 30
        self._slots = _Slots(s.max_associations, s.max_associations_per_peer)
        set_limits(ae, ConnectionLimits(s.artim_timeout_s, s.stall_timeout_s, self._operator_event))
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.maximum_pdu_size = s.max_pdu
        ae.require_called_aet = False  # checked in _on_requested, which logs the peer
        ae.add_supported_context(VERIFICATION)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, PREFERRED_TRANSFER_SYNTAXES)
        add_commitment_context(ae)  # storage commitment reports a PACS sends on a new association
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        t = self.settings.tls
        if not t.enabled:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(t.cert_file, t.key_file)  # type: ignore[arg-type]
        if t.ca_file:
            ctx.load_verify_locations(t.ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def start(self) -> None:
        # Each data set streams into a file as it arrives (memory flat whatever
        # the instance size), in our spool's tmp so the commit renames within
        # one filesystem: the association's guard names that folder (not the
        # process-wide tempfile.tempdir, which everything else in the process,
        # multiprocessing's sockets included, would inherit).
        configure()
        s = self.settings
        if not s.allowed_peers:
            log.warning("allowed_peers is empty: accepting associations from ANY calling AE title; "
                        "set allowed_peers before connecting a production PACS")
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REQUESTED, self._attach_guard),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
            *commitment_handlers(self.index, s),  # storage commitment reports on new associations
        ]
        try:
            self.server = start_server(self.build_ae(), (s.host, s.port), handlers, self._ssl_context())
        except OSError as exc:  # port taken, privileged, or an address that is not ours: one line, not a traceback
            raise ListenError(listen_problem(exc, s.host, s.port), exc.errno) from exc
        log.info("listening as %s on %s:%d (TLS %s)", s.ae_title, s.host, self.port, "on" if s.tls.enabled else "off")

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else self.settings.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # -- handlers (association threads) ----------------------------------------------

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        prim = assoc.requestor.primitive
        calling = str(prim.calling_ae_title).strip()
        called = str(prim.called_ae_title).strip()
        address = assoc.requestor.address
        if self.settings.require_called_ae and called != self.settings.ae_title:
            self._operator_event("association_rejected",
                                 f"called AE {called!r} is not ours ({self.settings.ae_title!r}); "
                                 f"calling AE {calling!r} from {address}")
            _reject(assoc, 0x07)
            return
        if self._rules and not _peer_allowed(self._rules, calling, address):
            self._operator_event("association_rejected",
                                 f"calling AE {calling!r} from {address} is not in allowed_peers")
            _reject(assoc, 0x03)
            return
        refusal = self._slots.admit(assoc, (calling, address))
        if refusal:
            self._operator_event("association_rejected",
                                 f"{refusal}: A-ASSOCIATE-RJ transient, local limit exceeded; "
                                 f"calling AE {calling!r} from {address}")
            _reject(assoc, 0x02, result=0x02, source=0x03)
            return
        log.debug("association requested by %r from %s", calling, address)

    def _operator_event(self, kind: str, message: str) -> None:
        """A WARNING line and an event-log row (AE titles and addresses only, never PHI)."""
        log.warning("%s: %s", kind.replace("_", " "), message)
        try:
            self.index.add_event(kind, message)
        except Exception:  # the index being down must not change the answer we give
            log.debug("could not record event", exc_info=True)

    def _on_echo(self, event: Any) -> int:
        return SUCCESS

    def _attach_guard(self, event: Any) -> None:
        """Give the association its stream guard before it is accepted (dicom/stream.py says why)."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = assoc.requestor.address

        def refused(status: int, why: str) -> None:
            self._refuse(status, why, why, calling, address)

        attach(assoc, ReceiveGuard(self.settings.min_free_disk_mb * 1024 * 1024, self.spool.free_bytes, refused,
                                   tmp_dir=self.spool.tmp))

    def _on_store(self, event: Any) -> Any:
        req = event.request
        tmp = Path(event.dataset_path)
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        address = assoc.requestor.address
        guard = guard_of(assoc)
        failed = guard.claim(tmp) if guard is not None else None
        try:
            if failed is not None:  # the stream could not be written (dicom/stream.py): nothing to inspect
                return self._refuse(OUT_OF_RESOURCES, failed, failed, calling, address)
            return self._store(event, req, tmp, calling, address)
        finally:
            # Whatever happened, no half-written or refused file stays behind.
            tmp.unlink(missing_ok=True)

    def _store(self, event: Any, req: Any, tmp: Path, calling: str, address: str) -> Any:
        try:
            # checked when the data set began to stream (dicom/stream.py) and again now it is complete
            if self.spool.free_bytes() < self.settings.min_free_disk_mb * 1024 * 1024:
                return self._refuse(OUT_OF_RESOURCES, "node disk below free-space watermark",
                                    f"free disk under min_free_disk_mb={self.settings.min_free_disk_mb}", calling, address)
            meta = inspect_received(
                tmp, str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID), str(event.context.transfer_syntax)
            )
        except Refused as r:
            return self._refuse(r.status, r.comment, r.comment, calling, address)
        try:
            # Only an object of a class the node sends can be one of its own reports coming back.
            if meta.sop_class_uid in SENT_SOP_CLASSES and self.index.is_own_object(meta.sop_instance_uid):
                with self._index_writes:
                    self.index.count_returned_own_object(meta.sop_instance_uid, calling, address)
                log.info("our own report %s came back from %r: Success, not stored again",
                         uid_tag(meta.sop_instance_uid), calling)
                return SUCCESS
            rel, size = self.spool.commit(tmp)
            outcome = self._index(meta, rel, size, calling, address)
            if outcome is None:
                return self._duplicate(meta, calling, address)
        except OSError as exc:
            return self._refuse(OUT_OF_RESOURCES, "node cannot write its spool",
                                f"cannot write spool: {exc.strerror or type(exc).__name__}", calling, address)
        except UidConflict as exc:
            # permanent: the PACS holds the same series UID under two studies; sending it again changes nothing
            return self._refuse(SERIES_IN_OTHER_STUDY, "series UID already held under another study",
                                f"{exc} (index study {exc.held_by})",
                                calling, address)
        except (OperationalError, IntegrityError, ValueError) as exc:
            log.debug("index error", exc_info=True)
            return self._refuse(OUT_OF_RESOURCES, "node index unavailable",
                                f"index unavailable or inconsistent: {type(exc).__name__}", calling, address)
        with self._lock:
            self._touched.setdefault(id(event.assoc), set()).add(outcome.study_id)
        log.debug("stored %s for study %d version %d", uid_tag(meta.sop_instance_uid), outcome.study_id, outcome.version)
        return SUCCESS

    def _index(self, meta: InstanceMeta, rel: str, size: int, calling: str, address: str) -> StoreOutcome | None:
        """Commit the index row of a file the spool made durable; None if the SOP instance was already stored.

        There is no look-up first: the unique SOP Instance UID makes the insert
        itself the duplicate check, which saves a query per instance at the
        price of a spool write per repeat (a PACS re-sending a study).
        """
        try:
            with self._index_writes:
                return self.index.add_instance(meta, rel, size, calling, address)
        except IntegrityError:
            self.spool.remove(rel)
            if self.index.is_known_instance(meta.sop_instance_uid):
                return None
            raise
        except BaseException:
            self.spool.remove(rel)  # not acknowledged, not indexed: do not keep it
            raise

    def _refuse(self, status: int, comment: str, why: str, calling: str, address: str) -> Dataset:
        """Answer a failure status; log and record why (the sender sees ``comment``)."""
        self._operator_event("store_refused", f"C-STORE refused (0x{status:04X}): {why}; calling AE {calling!r} from {address}")
        return _failure(status, comment)

    def _duplicate(self, meta: InstanceMeta, calling: str, address: str) -> int:
        with self._index_writes:
            self.index.count_duplicate(meta.sop_instance_uid, calling, address)
        log.info("duplicate instance %s from %r: first copy kept, Success sent", uid_tag(meta.sop_instance_uid), calling)
        return SUCCESS

    def _on_released(self, event: Any) -> None:
        _close_streams(event.assoc)
        with self._lock:
            studies = self._touched.pop(id(event.assoc), set())
        if studies:
            self.index.note_release(studies)
            if self.on_release:
                self.on_release()

    def _on_ended(self, event: Any) -> None:
        # An abort or a dropped connection never brings completion forward, and leaves no file behind.
        _close_streams(event.assoc)
        if getattr(event.assoc, "release_requested", False):
            # the peer closed its socket on reading our A-RELEASE-RP, before EVT_RELEASED ran: a clean
            # release, which _on_released (still to come, in the association's thread) records
            return
        with self._lock:
            self._touched.pop(id(event.assoc), None)


def _close_streams(assoc: Any) -> None:
    """Remove the data sets still streaming when an association ends (released, aborted, timed out, dropped)."""
    guard = guard_of(assoc)
    if guard is not None:
        n = guard.close_all()
        if n:
            log.warning("association ended with %d data set(s) incomplete: partial file(s) removed", n)


def _reject(assoc: Any, diagnostic: int, result: int = 0x01, source: int = 0x01) -> None:
    """A-ASSOCIATE-RJ: by default permanent, service-user, 0x03 calling AE / 0x07 called AE not recognised;
    for a slot limit transient (0x02), service-provider presentation related (0x03), local limit exceeded (0x02).

    ``kill`` waits until the DUL has sent the PDU, as pynetdicom's own
    negotiation does; returning without it closes the socket first and the
    peer sees an abort instead of a rejection.
    """
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


class _Slots:
    """The listener's association slots: ``total`` in all, ``per_peer`` per (calling AE title, address).

    An association takes a slot when its A-ASSOCIATE-RQ is admitted and
    holds it while its thread lives and it is neither released, aborted nor
    rejected; nothing has to hand it back, so no end-of-association path
    can leak one. Connections that have not sent their request hold none
    (the ARTIM timeout closes them). The peer key is the calling AE title
    and the address together: the title alone is sent in clear (a host
    claiming the PACS's title would use up the PACS's share), the address
    alone lumps every AE behind one host or NAT gateway together.
    """

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self._held: dict[Any, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def admit(self, assoc: Any, peer: tuple[str, str]) -> str | None:
        """Take a slot for ``assoc``; or the reason there is none (the association is then to be rejected)."""
        with self._lock:
            self._held = {a: p for a, p in self._held.items()
                          if a.is_alive() and not (a.is_released or a.is_aborted or a.is_rejected)}
            if len(self._held) >= self.total:
                return f"all {self.total} association slots in use (max_associations)"
            mine = sum(p == peer for p in self._held.values())
            if mine >= self.per_peer:
                return f"this peer holds {mine} of its {self.per_peer} association slots (max_associations_per_peer)"
            self._held[assoc] = peer
            return None


def _failure(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp
