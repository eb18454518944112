"""The network edge's own pieces on real loopback associations: the SCU's set-up, batcher and C-STORE loop,
the event-driven reactors and the C-STORE response encoder of the shim, the status rule, the spool's group commit."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from nodeutil import free_port
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta

from dicomnode import spool as spool_module
from dicomnode.config import DestinationSettings
from dicomnode.dicom.scu import (
    MAX_CONTEXTS,
    AssociationFailed,
    OutgoingFile,
    Timeouts,
    associate,
    batches,
    no_delay,
    store,
)
from dicomnode.dicom.shim import (
    EventAssociation,
    EventDUL,
    _file_meta,
    _plain_store_response,
    configure,
    start_server,
)
from dicomnode.dicom.sop import (
    MR_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    SENT_SOP_CLASSES,
    VERIFICATION,
)
from dicomnode.dicom.status import (
    CANNOT_UNDERSTAND,
    COMMAND_DATASET_MISMATCH,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    MISSING_OR_INVALID_UID,
    OUT_OF_RESOURCES,
    PIXEL_DATA_TRUNCATED,
    Verdict,
    classify_status,
    is_permanent,
    is_transient,
)
from dicomnode.spool import Spool

# bounds for a peer in this process on a loaded machine (a closed port answers at once anyway)
FAST = Timeouts.uniform(60.0)


def write_image(path: Path, sop_class: str = SECONDARY_CAPTURE_IMAGE_STORAGE) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class Peer:
    """A storage SCP served the node's way (EventRequestHandler), answering C-STORE with ``status``."""

    def __init__(self, status: int = 0x0000, sop_classes: tuple[str, ...] = (SECONDARY_CAPTURE_IMAGE_STORAGE,)) -> None:
        self.status = status
        self.received: list[str] = []
        self.files: list[bytes] = []  # as streamed to disk by the event-driven acceptor
        self.assocs: list[Any] = []
        self.port = free_port()
        ae = AE(ae_title="PEER")
        ae.add_supported_context(VERIFICATION)
        for sop in sop_classes:
            ae.add_supported_context(sop, [ExplicitVRLittleEndian])
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, lambda e: self.assocs.append(e.assoc))]
        self.server = start_server(ae, ("127.0.0.1", self.port), handlers, None)

    def _on_store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        self.files.append(Path(event.dataset_path).read_bytes())
        return self.status

    def dest(self) -> DestinationSettings:
        return DestinationSettings(ae_title="PEER", host="127.0.0.1", port=self.port)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.server.shutdown()


def test_no_delay_switches_nagle_off_on_an_established_association() -> None:
    port = free_port()
    scp = AE(ae_title="PEER")
    scp.add_supported_context(VERIFICATION)
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        scu = AE(ae_title="US")
        scu.add_requested_context(VERIFICATION)
        assoc = scu.associate("127.0.0.1", port, ae_title="PEER")
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # pynetdicom's default
        no_delay(assoc)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        server.shutdown()


def test_configure_sets_pynetdicom_once() -> None:
    configure()
    assert _config.STORE_RECV_CHUNKED_DATASET and _config.STORE_SEND_CHUNKED_DATASET
    assert _config.LOG_HANDLER_LEVEL == "none"  # the pynetdicom logger is not at DEBUG here


def test_batches_keep_order_and_split_past_max_contexts(tmp_path: Path) -> None:
    files = [OutgoingFile(tmp_path / f"{k}", f"1.2.3.{k % (MAX_CONTEXTS + 5)}", str(ExplicitVRLittleEndian), ref=k)
             for k in range(2 * (MAX_CONTEXTS + 5))]
    got = list(batches(files))
    assert [f for b in got for f in b] == files
    assert all(len({f.context for f in b}) <= MAX_CONTEXTS for b in got)
    assert len(got) == 3
    assert list(batches([])) == []


def test_associate_sets_up_event_driven_nodelay_and_releases(peer: Peer) -> None:
    with associate(peer.dest(), [(VERIFICATION, str(ImplicitVRLittleEndian))], calling_ae="US", timeouts=FAST) as a:
        assert isinstance(a, EventAssociation) and isinstance(a.dul, EventDUL)
        assert a.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert [int(a.send_c_echo().Status) for _ in range(20)] == [0] * 20
    assert a.is_released
    # the acceptor side ran the event-driven reactors too, and its thread ends after the release
    (theirs,) = peer.assocs
    assert isinstance(theirs, EventAssociation)
    theirs.join(120)
    assert not theirs.is_alive()


def test_store_yields_one_outcome_per_file_in_order(tmp_path: Path, peer: Peer) -> None:
    sc1, sc2 = write_image(tmp_path / "a.dcm"), write_image(tmp_path / "b.dcm")
    mr = write_image(tmp_path / "mr.dcm", MR_IMAGE_STORAGE)  # a class the peer does not take
    broken = tmp_path / "gone.dcm"
    files = [OutgoingFile(sc1, SECONDARY_CAPTURE_IMAGE_STORAGE, str(ExplicitVRLittleEndian), 1),
             OutgoingFile(mr, MR_IMAGE_STORAGE, str(ExplicitVRLittleEndian), 2),
             OutgoingFile(broken, SECONDARY_CAPTURE_IMAGE_STORAGE, str(ExplicitVRLittleEndian), 3),
             OutgoingFile(sc2, SECONDARY_CAPTURE_IMAGE_STORAGE, str(ExplicitVRLittleEndian), 4)]
    got = list(store(peer.dest(), files, calling_ae="US", timeouts=FAST))
    assert [f.ref for f, _ in got] == [1, 2, 3, 4]
    verdicts = [o.verdict for _, o in got]
    assert verdicts == [Verdict.SENT, Verdict.PARK, Verdict.PARK, Verdict.SENT]
    assert "did not accept SOP class" in got[1][1].reason and "cannot send file" in got[2][1].reason
    assert len(peer.received) == 2 and len(peer.assocs) == 1  # one association for the batch
    # what arrived is the file as sent: its data set byte for byte, under a file meta naming it
    for sent, got in zip((sc1, sc2), peer.files):
        original = dcmread(sent)
        data_set = sent.read_bytes()[144 + int.from_bytes(sent.read_bytes()[140:144], "little"):]
        assert got.endswith(data_set)
        meta = dcmread(BytesIO(got)).file_meta
        assert meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_store_answers_every_file_when_there_is_no_association(tmp_path: Path) -> None:
    f = write_image(tmp_path / "a.dcm")
    files = [OutgoingFile(f, SECONDARY_CAPTURE_IMAGE_STORAGE, str(ExplicitVRLittleEndian), k) for k in range(3)]
    nobody = DestinationSettings(ae_title="GONE", host="127.0.0.1", port=free_port())
    got = list(store(nobody, files, calling_ae="US", timeouts=FAST))
    assert [o.verdict for _, o in got] == [Verdict.RETRY] * 3
    assert "could not connect" in got[0][1].reason
    with pytest.raises(AssociationFailed) as failed, \
            associate(nobody, [(VERIFICATION, str(ImplicitVRLittleEndian))], calling_ae="US", timeouts=FAST):
        pass
    assert failed.value.outcome.verdict is Verdict.RETRY


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xC210])
def test_plain_store_response_is_byte_identical_to_pynetdicoms(status: int) -> None:
    for sop_class, sop_instance, message_id in (("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", 1),
                                                ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.3.45", 65535)):
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = sop_instance
        rsp.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        (pdata,) = list(message.encode_msg(1, 0))
        ((_, theirs),) = pdata.presentation_data_value_list
        assert _plain_store_response(rsp) == theirs[1:]  # after the message control header
    rsp.ErrorComment = "with a comment"
    assert _plain_store_response(rsp) is None  # optional elements: pynetdicom's encoder


def test_streamed_file_meta_is_byte_identical_to_pynetdicoms() -> None:
    for sop_class, sop_instance, syntax in ((MR_IMAGE_STORAGE, "1.2.3.4", str(ExplicitVRLittleEndian)),
                                            (SECONDARY_CAPTURE_IMAGE_STORAGE, "1.2.3.45", str(ImplicitVRLittleEndian)),
                                            (MR_IMAGE_STORAGE, "1.2.3", "1.2.840.10008.1.2.4.90")):
        theirs = DicomBytesIO()
        write_file_meta_info(theirs, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance,
                                                      transfer_syntax=syntax))
        assert _file_meta(sop_class, sop_instance, syntax) == theirs.getvalue()
    assert _file_meta(MR_IMAGE_STORAGE, "1.2.\u00e9", str(ExplicitVRLittleEndian)) is None  # pydicom's encoder then


def test_status_rule_both_ways() -> None:
    """What the listener answers, read by the outbox's classifier: transient retries, permanent parks."""
    assert is_transient(OUT_OF_RESOURCES) and not is_permanent(OUT_OF_RESOURCES)
    assert classify_status(OUT_OF_RESOURCES).verdict is Verdict.RETRY
    for code in (DATASET_DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND, MISSING_OR_INVALID_UID,
                 COMMAND_DATASET_MISMATCH, PIXEL_DATA_TRUNCATED):
        assert is_permanent(code) and not is_transient(code)
        assert classify_status(code).verdict is Verdict.PARK
    assert is_transient(0xFE00) and classify_status(0xFE00).verdict is Verdict.RETRY
    assert SENT_SOP_CLASSES == {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"}


def test_spool_directory_fsyncs_are_shared_and_start_after_each_rename(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: concurrent commits share directory fsyncs, and none returns before one that began after it."""
    rounds: list[tuple[float, float]] = []
    real = spool_module._fsync_path

    def slow_fsync(path: Path) -> None:
        start = time.monotonic()
        time.sleep(0.05)
        if path.parent.name == "store" and not rounds:
            # a disk slow enough that the other commits all arrive during the first round, whatever the
            # machine's load (a fixed 50 ms alone relied on the 8 threads being scheduled within it)
            deadline = time.monotonic() + 120
            while len(list(path.glob("*.dcm"))) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
        real(path)
        if path.parent.name == "store":
            rounds.append((start, time.monotonic()))

    monkeypatch.setattr(spool_module, "_fsync_path", slow_fsync)
    spool = Spool(tmp_path, fsync=True)
    (spool.store / time.strftime("%Y%m%d", time.gmtime())).mkdir(parents=True)
    done: list[tuple[float, float, Path]] = []
    barrier = threading.Barrier(8)

    def commit(k: int) -> None:
        tmp = spool.tmp / f"{k}.part"
        tmp.write_bytes(b"x" * 1000)
        barrier.wait()
        before = time.monotonic()
        rel, _ = spool.commit(tmp)
        done.append((before, time.monotonic(), tmp_path / rel))

    threads = [threading.Thread(target=commit, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 8 and all(p.read_bytes() == b"x" * 1000 for _, _, p in done)
    assert 1 <= len(rounds) < 8  # shared, not one per commit
    for before, after, _ in done:
        assert any(before <= start and end <= after for start, end in rounds)
    assert list(spool.tmp.iterdir()) == []
