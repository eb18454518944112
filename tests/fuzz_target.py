"""The receive path as a fuzz target, and the seed corpus it starts from.

Shared by ``benchmarks/fuzz_receive.py`` (the atheris run) and
``tests/test_fuzz_receive.py`` (a bounded run in CI, and every finding kept as
an explicit regression input). It lives with the tests, not in the
``dicomnode`` package: the node never fuzzes itself, and nothing here may end
up in a deployment.

What one input exercises is what the listener does with one C-STORE whose
data set pynetdicom streamed to disk (:mod:`dicomnode.dicom.scp`): the file
is the preamble and the File Meta group exactly as the node's pynetdicom shim
writes them (:func:`dicomnode.dicom.shim._file_meta`), then the data set
bytes as they arrived; :func:`~dicomnode.dicom.scp.inspect_received` judges
it; what it accepts is made durable by :meth:`Spool.commit` and indexed by
:meth:`Index.add_instance`, with the same handling of duplicates and index
conflicts as ``StorageSCP._index``. Only the public functions are called, so
a change to the listener's checks is fuzzed as soon as it is made.

The invariants (a broken one is a :class:`Finding`, i.e. a crash to the fuzzer):

- the only outcomes are acceptance, or :class:`Refused` with a permanent
  (0xA9xx, 0xCxxx) or transient (0xA7xx) status; any other exception
  escaping is a bug (pynetdicom would answer 0xC211 and log a traceback,
  and the refusal would not carry the node's own reason);
- what is accepted can be read back from the spool by pydicom: header
  (``stop_before_pixels``), whole file, and every element's value (the
  sequence identifier and assembly read these later; an acknowledged
  instance the PACS may have deleted must be usable);
- no file is written (or renamed, removed, created) outside the harness's
  temporary data directory, checked with an audit hook that also *blocks*
  such writes, so a fuzz run can never damage the host;
- nothing stays in ``spool/tmp`` once the listener's temporary file is
  removed (as ``StorageSCP._on_store`` does), and nothing lands in
  ``spool/store`` but the harness's own commit (which it removes again).

Input layout (see :func:`encode_input`): one byte choosing the negotiated
transfer syntax, the command's Affected SOP Class UID and Affected SOP
Instance UID (each one length byte, then ASCII), then the data set bytes.
The command UIDs travel in the input because pynetdicom takes them from the
C-STORE command set, not from the data set: the fuzzer must be able to make
them agree (to reach acceptance) or disagree.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import traceback
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from sqlalchemy.exc import IntegrityError

from dicomnode.dicom.scp import Refused, inspect_received
from dicomnode.dicom.shim import _file_meta
from dicomnode.dicom import status as _status
from dicomnode.dicom.status import OUT_OF_RESOURCES, SUCCESS
from dicomnode.index import studies as _studies
from dicomnode.index.studies import Index
from dicomnode.spool import Spool

# The syntax byte picks one of these (modulo): the four uncompressed encodings
# a PACS may negotiate (big endian is retired but still accepted by the node,
# which offers every syntax pynetdicom knows) and one encapsulated syntax.
SYNTAXES: tuple[str, ...] = (
    str(ImplicitVRLittleEndian),
    str(ExplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(JPEGBaseline8Bit),
)

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


# The listener's answer to a series UID held under another study (a permanent 0xCxxx status since
# the index raises UidConflict; 0xA700 before). Looked up, not imported, so the harness runs on either.
_UID_CONFLICT: type[ValueError] | None = getattr(_studies, "UidConflict", None)
_SERIES_IN_OTHER_STUDY: int = getattr(_status, "SERIES_IN_OTHER_STUDY", OUT_OF_RESOURCES)


def allowed_status(status: int) -> bool:
    """A refusal the node may give: transient 0xA7xx, or permanent 0xA9xx / 0xCxxx (dicomnode.dicom.status)."""
    return 0xA700 <= status <= 0xA7FF or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


# -- input layout ------------------------------------------------------------------------------


def encode_input(syntax: str | int, sop_class: str, sop_instance: str, dataset: bytes) -> bytes:
    """One fuzz input: syntax byte, command SOP Class and Instance UIDs (length-prefixed ASCII), data set bytes."""
    index = SYNTAXES.index(str(syntax)) if isinstance(syntax, str) else syntax
    cls, inst = sop_class.encode("ascii"), sop_instance.encode("ascii")
    if len(cls) > 255 or len(inst) > 255:
        raise ValueError("command UIDs are at most 255 bytes here")
    return bytes([index, len(cls)]) + cls + bytes([len(inst)]) + inst + dataset


def decode_input(data: bytes) -> tuple[str, str, str, bytes]:
    """Split any byte string into (transfer syntax, command SOP class, command SOP instance, data set bytes).

    Total: every input decodes, so no mutation is wasted on a framing error.
    The UIDs are made 7-bit ASCII (pynetdicom decodes the command set's UI
    values as ASCII; the node's meta writer takes the same path for them).
    """
    syntax = SYNTAXES[data[0] % len(SYNTAXES)] if data else SYNTAXES[0]
    pos = 1
    fields = []
    for _ in range(2):
        n = data[pos] if pos < len(data) else 0
        raw = data[pos + 1:pos + 1 + n]
        fields.append(bytes(b & 0x7F for b in raw).decode("ascii"))
        pos += 1 + n
    return syntax, fields[0], fields[1], data[pos:]


# -- findings ----------------------------------------------------------------------------------


class Finding(AssertionError):
    """A broken invariant of the receive path: what the fuzzer reports as a crash.

    ``signature`` groups findings that are one bug: the kind plus the type
    and innermost project or pydicom frame of the exception behind it (no
    line numbers, so it survives unrelated edits).
    """

    def __init__(self, kind: str, message: str, cause: BaseException | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.cause = cause
        self.signature = _signature(kind, cause)

    def report(self) -> str:
        """Kind, message and the cause's traceback, as written next to a crash input."""
        lines = [f"signature: {self.signature}", f"{self.kind}: {self.message}"]
        if self.cause is not None:
            lines.append("".join(traceback.format_exception(self.cause)))
        return "\n".join(lines)


def _signature(kind: str, cause: BaseException | None) -> str:
    if cause is None:
        return kind
    where = "?"
    tb = cause.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if ("dicomnode" in name or "pydicom" in name) and "fuzz_target" not in name:
            module = Path(name).stem
            where = f"{module}.{tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return f"{kind}:{type(cause).__name__}@{where}"


@dataclass(frozen=True)
class Outcome:
    """What the listener would answer: ``status`` 0x0000 when stored (or a duplicate), else the refusal's."""

    status: int
    detail: str

    @property
    def accepted(self) -> bool:
        return self.status == SUCCESS


# -- the write guard ---------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS_1 = {"os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.chown", "os.utime",
                  "tempfile.mkstemp", "tempfile.mkdtemp", "shutil.rmtree", "sqlite3.connect"}
_PATH_EVENTS_2 = {"os.rename", "os.link", "os.symlink", "shutil.move", "shutil.copyfile", "shutil.copytree"}


class _WriteGuard:
    """A process-wide audit hook (they cannot be removed), armed only while a harness runs an input.

    Disarmed it returns at once, so a pytest process that imports this module
    pays nothing outside the fuzz tests. Armed, any filesystem change outside
    ``root`` is recorded and refused (the hook raises PermissionError, so the
    write does not happen); the harness turns the record into a Finding even
    if the receive path swallowed the PermissionError.
    """

    def __init__(self) -> None:
        self.root: str | None = None
        self.violations: list[str] = []
        self._installed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        with self._lock:
            if not self._installed:
                sys.addaudithook(self._hook)
                self._installed = True

    @contextmanager
    def armed(self, root: Path) -> Iterator[list[str]]:
        self.violations = []
        self.root = os.path.realpath(root) + os.sep
        try:
            yield self.violations
        finally:
            self.root = None

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        root = self.root
        if root is None:
            return
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            if mode is not None:
                if not any(c in mode for c in "wax+"):
                    return
            elif not flags & _WRITE_FLAGS:
                return
            paths: tuple[Any, ...] = (path,)
        elif event in _PATH_EVENTS_1:
            paths = args[:1]
        elif event in _PATH_EVENTS_2:
            paths = args[:2]
        else:
            return
        for p in paths:
            if p is None or isinstance(p, int):
                continue
            text = os.fsdecode(p)
            if text in (":memory:", "", os.devnull):
                continue
            real = os.path.realpath(text)
            if not (real + os.sep).startswith(root):
                self.violations.append(f"{event} {text!r}")
                raise PermissionError(f"fuzz harness: {event} outside the data dir: {text!r}")


_GUARD = _WriteGuard()


def guarded(root: Path) -> Any:
    """Arm the write guard for ``root`` (a context manager yielding the list of violations).

    Public so the tests can check the guard itself: a guard that never fires
    would make every "no write outside" verdict vacuous.
    """
    _GUARD.install()
    return _GUARD.armed(root)


def fast_tmp() -> str | None:
    """A RAM-backed directory when the host has a roomy one: the index's fsyncs (synchronous=FULL) cost nothing there.

    Only with 1 GiB free: a container's /dev/shm is often 64 MiB, and a full
    disk under the index would surface as a false crash (OperationalError).
    """
    shm = "/dev/shm"
    try:
        roomy = os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 1 << 30
    except OSError:
        return None
    return shm if roomy else None


# -- the harness -------------------------------------------------------------------------------


class ReceiveHarness:
    """A temporary data directory with a spool and a SQLite index, and :meth:`run` for one input.

    Made once per process (creating the index runs the Alembic migrations:
    about a second), reused for every input: the index fills with what was
    accepted, which is realistic (duplicates, studies that gain series, a
    series UID reused under another study all happen).
    """

    def __init__(self, parent: str | Path | None = None, check_elements: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dicomnode-fuzz-", dir=parent or fast_tmp()))
        self.data_dir = self.root / "data"
        # fsync off: durability is not what is fuzzed, and the spool's code path is the same but for the flush
        self.spool = Spool(self.data_dir, fsync=False)
        self.index = Index(f"sqlite:///{self.data_dir / 'index.sqlite3'}")
        self.check_elements = check_elements
        _GUARD.install()

    def close(self) -> None:
        """Dispose of the index and remove the data directory."""
        self.index.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ReceiveHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, data: bytes) -> Outcome:
        """Receive one input as the listener would; return its outcome or raise :class:`Finding`."""
        syntax, sop_class, sop_instance, body = decode_input(data)
        meta = _file_meta(sop_class, sop_instance, syntax)
        if meta is None:  # cannot happen for ASCII UIDs under 256 bytes: a harness bug, not a finding
            raise RuntimeError("the shim wrote no file meta for ASCII UIDs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on most garbage; pytest -W error must not change outcomes
            with guarded(self.data_dir) as violations:
                # the listener's temporary file: pynetdicom's NamedTemporaryFile in tempfile.tempdir = spool/tmp
                fd, name = tempfile.mkstemp(dir=self.spool.tmp, suffix=".dcm")
                tmp = Path(name)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(b"\x00" * 128 + b"DICM" + meta + body)
                    outcome = self._receive(tmp, sop_class, sop_instance, syntax)
                except Finding:
                    raise
                except Exception as exc:
                    raise Finding("escaped", f"{type(exc).__name__} escaped the receive path: {exc}", exc) from exc
                finally:
                    tmp.unlink(missing_ok=True)  # as StorageSCP._on_store does, whatever happened
                    leftovers = self._leftovers()
            if violations:
                raise Finding("write-outside", "; ".join(violations[:5]))
            if leftovers:
                raise Finding("left-behind", ", ".join(leftovers[:5]))
        return outcome

    def _receive(self, tmp: Path, sop_class: str, sop_instance: str, syntax: str) -> Outcome:
        try:
            meta = inspect_received(tmp, sop_class, sop_instance, syntax)
        except Refused as r:
            if not allowed_status(r.status):
                raise Finding("bad-status", f"refused with 0x{r.status:04X} ({r.comment})", r) from r
            return Outcome(r.status, r.comment)
        rel, size = self.spool.commit(tmp)
        try:
            # Checked before the insert: a duplicate's bytes are dropped by the listener, but the
            # invariant "what inspect_received accepts is readable" must hold for them too.
            self._check_readable(self.data_dir / rel)
            try:
                self.index.add_instance(meta, rel, size, "FUZZSCU", "127.0.0.1")
            except IntegrityError:
                if self.index.is_known_instance(meta.sop_instance_uid):
                    return Outcome(SUCCESS, "duplicate")  # StorageSCP: first copy kept, Success
                raise
            except ValueError as exc:  # StorageSCP._store's mapping: a UID conflict is permanent, the rest transient
                conflict = _UID_CONFLICT is not None and isinstance(exc, _UID_CONFLICT)
                return Outcome(_SERIES_IN_OTHER_STUDY if conflict else OUT_OF_RESOURCES, f"index refused: {exc}")
            return Outcome(SUCCESS, "stored")
        finally:
            # A new instance's file would stay in the spool; the harness drops it so the data dir stays
            # small (the index row keeps a dangling path, which nothing here reads).
            self.spool.remove(rel)

    def _check_readable(self, path: Path) -> None:
        try:
            dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise Finding("unreadable-header", f"accepted, but dcmread(stop_before_pixels=True) fails: {exc}",
                          exc) from exc
        try:
            ds = dcmread(path)
        except Exception as exc:
            raise Finding("unreadable-file", f"accepted, but dcmread() of the whole file fails: {exc}", exc) from exc
        short = _short_elements(ds)
        if short:
            raise Finding("accepted-truncated", f"accepted, but {short} than its declared length")
        if not self.check_elements:
            return
        # A fresh read: a failed conversion can leave a half-converted element behind that a second
        # access returns without error (an ambiguous VR left unresolved), so nothing may have touched it.
        ds = dcmread(path)
        try:
            _decode_all(ds)
        except Exception as exc:
            raise Finding("undecodable-element", f"accepted, but an element cannot be decoded: {exc}", exc) from exc

    def _leftovers(self) -> list[str]:
        """Anything in spool/tmp or spool/store after an input (the harness removes what it stored itself).

        Removed once reported, so one finding does not repeat on every later input.
        """
        found = list(self.spool.tmp.iterdir())
        for day in self.spool.store.iterdir():
            if day.is_dir():
                found.extend(day.iterdir())
        for p in found:
            if p.is_file():
                p.unlink(missing_ok=True)
        return [str(p.relative_to(self.data_dir)) for p in found]


def _decode_all(ds: Dataset) -> None:
    """Decode every public element and walk every sequence (private ones too), as the listener promises.

    Private non-sequence elements are held to their form only (the listener's
    documented policy, ``scp._check_values``): a known VR and a length that
    fits it; their values are vendors' business and the node reads none it
    cannot do without.
    """
    from pydicom.dataelem import RawDataElement
    from pydicom.valuerep import VR

    fixed = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "SV": 8, "UV": 8, "OW": 2, "OF": 4,
             "OD": 8, "OL": 4, "OV": 8}
    for tag in list(ds.keys()):
        raw = ds._dict[tag]
        if tag.is_private and isinstance(raw, RawDataElement) and raw.VR != "SQ":
            if raw.VR is not None and raw.VR not in {v.value for v in VR}:
                raise ValueError(f"unknown VR {raw.VR!r} in {tag}")
            if raw.value is not None and fixed.get(raw.VR or "") and len(raw.value) % fixed[raw.VR]:
                raise ValueError(f"length {len(raw.value)} does not fit VR {raw.VR} in {tag}")
            continue
        elem = ds[tag]
        elem.value  # noqa: B018
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item)


def _short_elements(ds: Dataset, depth: int = 0) -> str | None:
    """The first element whose value came out shorter than its declared length, or None.

    pydicom's reader takes what ``read(length)`` returns without comparing:
    a data set cut inside its last element parses to the end of the file, so
    ``inspect_received``'s end-of-parse check sees nothing wrong. Looked at
    without converting values (``get_item`` gives the raw element), items of
    sequences included.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)  # never converts: only the bytes as read
        value = getattr(raw, "value", None)
        length = getattr(raw, "length", None)
        if isinstance(value, bytes) and isinstance(length, int) and length != 0xFFFFFFFF and len(value) < length:
            return f"element {tag} has {len(value)} bytes, fewer"
        if depth < 8 and getattr(raw, "VR", None) in ("SQ", None, "UN"):  # implicit VR: known only once converted
            try:
                elem = ds[tag]
            except Exception:
                continue  # undecodable: the element walk reports it
            if elem.VR != "SQ":
                continue
            for item in elem.value:
                found = _short_elements(item, depth + 1) if isinstance(item, Dataset) else None
                if found:
                    return found
    return None


# -- minimizing --------------------------------------------------------------------------------


def signature_of(harness: ReceiveHarness, data: bytes) -> str | None:
    """The signature of the finding ``data`` raises, or None if it passes."""
    try:
        harness.run(data)
    except Finding as f:
        return f.signature
    return None


def minimize(harness: ReceiveHarness, data: bytes, budget_s: float = 60.0) -> bytes:
    """A smaller input that raises the same finding (deletion-only delta debugging).

    For regression tests: a crash input as the fuzzer left it is mostly
    irrelevant bytes; the smallest one that still fails the same way says
    what the bug is and fits in a test file. libFuzzer's own
    ``-minimize_crash`` re-executes the command line, which the two-process
    runner does not support, hence this (uninstrumented, in process).
    """
    import time

    target = signature_of(harness, data)
    if target is None:
        raise ValueError("the input raises no finding")
    best = data
    chunk = max(1, len(best) // 2)
    deadline = time.monotonic() + budget_s
    while chunk >= 1 and time.monotonic() < deadline:
        i, progressed = 0, False
        while i < len(best) and time.monotonic() < deadline:
            candidate = best[:i] + best[i + chunk:]
            if signature_of(harness, candidate) == target:
                best, progressed = candidate, True
            else:
                i += chunk
        if not progressed:
            chunk //= 2
    return best


# -- corpus ------------------------------------------------------------------------------------


def encode_dataset(ds: Dataset, syntax: str) -> bytes:
    """The data set alone in ``syntax``, as pynetdicom would receive it in P-DATA fragments (no preamble, no meta)."""
    uid = UID(syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = uid.is_little_endian
    fp.is_implicit_VR = uid.is_implicit_VR
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if uid.is_deflated:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, no zlib header (PS3.5 A.5)
        raw = c.compress(raw) + c.flush()
    return raw


def _plain(ds: Dataset) -> Dataset:
    """A copy without file meta, every raw element converted (so it re-encodes in any syntax)."""
    out = copy.deepcopy(ds)
    for _ in out.iterall():
        pass
    if hasattr(out, "file_meta"):
        del out.file_meta
    return out


def _with_private(ds: Dataset) -> Dataset:
    out = _plain(ds)
    block = out.private_block(0x0029, "DICOMNODE FUZZ", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "OB", b"\x01\x02\x03\x04")
    block.add_new(0x03, "SQ", Sequence([Dataset()]))
    block[0x03].value[0].add_new(0x00100020, "LO", "NESTED")
    out.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    out.add_new(0x0019100C, "IS", "1000")
    return out


def _without_pixels(ds: Dataset, sop_class: str | None = None) -> Dataset:
    out = _plain(ds)
    for kw in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "PhotometricInterpretation"):
        if kw in out:
            delattr(out, kw)
    if sop_class:
        out.SOPClassUID = sop_class
    return out


def _encapsulated(ds: Dataset, frames: int = 1, undefined_seq: bool = False) -> Dataset:
    """Pixel data as JPEG-looking fragments (never decoded on the way in: only framing matters)."""
    out = _plain(ds)
    fake_jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
    out.PixelData = encapsulate([fake_jpeg] * frames, has_bot=True)
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    if frames > 1:
        out.NumberOfFrames = frames
    if undefined_seq:
        for elem in out.iterall():
            if elem.VR == "SQ":
                elem.is_undefined_length = True
    return out


def _synth_datasets(workdir: Path) -> list[Dataset]:
    """A few datasets written by the project's synthetic study writer: classic MR per vendor, one Enhanced MR."""
    from dicomnode.synth.phantom import make_phantom
    from dicomnode.synth.writer import write_study

    vols, aff = make_phantom(shape=(4, 4, 2), spacing=(3.0, 3.0, 3.0), seed=7)
    out: list[Dataset] = []
    for n, (vendor, enhanced, role) in enumerate((("siemens", False, "T1"), ("ge", False, "FLAIR"),
                                                  ("philips", False, "T2"), ("siemens", True, "T1CE"))):
        written = write_study(vols, aff, workdir / f"s{n}", vendor=vendor, enhanced=enhanced, seed=n,
                              roles=[role], patient_name="FUZZ^SYNTH" if n else "Müller^Jörg")
        out.append(dcmread(written.all_files()[0]))
    return out


def _sr_dataset(study: str) -> Dataset:
    """A small SR document: no pixel data, nested content sequences (undefined length)."""
    ds = Dataset()
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz", "sr"])
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fuzz", "sr-series"])
    ds.Modality = "SR"
    ds.SeriesNumber = 900
    ds.ValueType = "CONTAINER"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "grade: high"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([concept])
    ds.ContentSequence = Sequence([item])
    ds["ContentSequence"].is_undefined_length = True
    return ds


def seed_corpus(workdir: Path | None = None) -> dict[str, bytes]:
    """A few dozen small, mostly valid inputs, generated at run time (nothing large is committed).

    Built from tests/nodeutil.py ``mr_dataset`` and the project's synthetic
    writer, in every syntax of :data:`SYNTAXES`, with and without pixel
    data, with sequences (defined and undefined length), private tags,
    multi-frame and non-ASCII character sets; plus a few the node must refuse
    (command mismatch, image class without pixels) so the refusal paths are
    reached from the start. Names are stable, contents deterministic.
    """
    from nodeutil import mr_dataset

    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="dicomnode-fuzz-seed-")) if workdir is None else workdir
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _seed_corpus(work, mr_dataset)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _seed_corpus(work: Path, mr_dataset: Any) -> dict[str, bytes]:
    study = generate_uid(entropy_srcs=["fuzz", "study"])
    series = generate_uid(entropy_srcs=["fuzz", "series"])
    sop = generate_uid(entropy_srcs=["fuzz", "sop"])
    mr = _plain(mr_dataset(study, series, sop, rows=4, cols=4))
    multi = _plain(mr_dataset(study, series, generate_uid(entropy_srcs=["fuzz", "multi"]), rows=2, cols=2))
    multi.NumberOfFrames = 3
    multi.PixelData = bytes(2 * 2 * 2 * 3)
    float_px = _without_pixels(mr_dataset(study, series, generate_uid(entropy_srcs=["fuzz", "float"])))
    float_px.Rows = float_px.Columns = 2
    float_px.FloatPixelData = bytes(2 * 2 * 4)
    raw = _without_pixels(mr, RAW_DATA)
    raw.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz", "raw"])
    sc = _plain(mr)
    sc.SOPClassUID = SECONDARY_CAPTURE
    sc.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz", "sc"])
    sc.SpecificCharacterSet = "ISO_IR 192"
    sc.PatientName = "Ünïcødé^名前"
    sr = _sr_dataset(study)
    synth = [_plain(d) for d in _synth_datasets(work)]

    cases: dict[str, tuple[Dataset, tuple[str, ...]]] = {
        "mr": (mr, SYNTAXES[:4]),
        "mr-private": (_with_private(mr), SYNTAXES[:4]),
        "mr-multiframe": (multi, SYNTAXES[:2]),
        "mr-float-pixels": (float_px, SYNTAXES[1:2]),
        "raw-no-pixels": (raw, SYNTAXES[:4]),
        "sc-utf8": (sc, SYNTAXES[:2]),
        "sr-undefined-seq": (sr, SYNTAXES[:4]),
        "synth-siemens": (synth[0], SYNTAXES[:3]),
        "synth-ge": (synth[1], SYNTAXES[1:2]),
        "synth-philips": (synth[2], SYNTAXES[1:2]),
        "synth-enhanced": (synth[3], SYNTAXES[:4]),
        "mr-jpeg": (_encapsulated(mr), (str(JPEGBaseline8Bit),)),
        "enhanced-jpeg": (_encapsulated(synth[3], frames=2, undefined_seq=True), (str(JPEGBaseline8Bit),)),
    }
    corpus: dict[str, bytes] = {}
    for name, (ds, syntaxes) in cases.items():
        for syntax in syntaxes:
            body = encode_dataset(ds, str(JPEGBaseline8Bit) if syntax == str(JPEGBaseline8Bit) else syntax)
            corpus[f"{name}-{SYNTAXES.index(syntax)}"] = encode_input(
                syntax, str(ds.SOPClassUID), str(ds.SOPInstanceUID), body)
    # refusals, so their paths are in the corpus from the first input on
    body = encode_dataset(mr, str(ExplicitVRLittleEndian))
    corpus["refuse-instance-mismatch"] = encode_input(str(ExplicitVRLittleEndian), MR, "1.2.3.4", body)
    corpus["refuse-class-mismatch"] = encode_input(str(ExplicitVRLittleEndian), RAW_DATA, str(mr.SOPInstanceUID), body)
    corpus["truncated-last-element"] = encode_input(str(ExplicitVRLittleEndian), MR, str(mr.SOPInstanceUID), body[:-7])
    corpus["refuse-syntax-mismatch"] = encode_input(str(ImplicitVRLittleEndian), MR, str(mr.SOPInstanceUID), body)
    nopix = _without_pixels(mr)
    corpus["refuse-mr-no-pixels"] = encode_input(str(ExplicitVRLittleEndian), MR, str(mr.SOPInstanceUID),
                                                 encode_dataset(nopix, str(ExplicitVRLittleEndian)))
    corpus["empty"] = b""
    return corpus


def input_name(data: bytes) -> str:
    """The name libFuzzer gives an input (its SHA-1), so seeds and found units share one naming."""
    return hashlib.sha1(data).hexdigest()


def quiet_logging() -> None:
    """pydicom logs a line per oddity; a fuzz run makes millions of them."""
    for name in ("pydicom", "dicomnode", "sqlalchemy", "alembic", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
