"""The listener's memory stays flat whatever the sender does with PDU sizes.

Peak RSS (``VmHWM`` of the ``dicomnode serve`` process, embedded worker off)
before and after: a 64 MiB instance from a pynetdicom sender that would send
it as one PDU if the node let it (the sender's own maximum is 0: unlimited),
and a peer announcing a 1 GiB P-DATA-TF PDU (over the maximum we advertise)
that must be aborted without being read.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from nodeutil import MR, NODE_AET, NodeProcess
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicomnode.dicom.shim import configure

MIB = 1024 * 1024


@pytest.fixture(autouse=True, scope="module")
def _send_files_as_they_are() -> None:
    """The sender streams the file from disk (the test process does not hold the instance either)."""
    configure()


def vm_hwm(pid: int) -> int:
    """Peak resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def big_mr(path: Path, rows: int, cols: int) -> Path:
    """One MR instance of rows x cols 16-bit pixels, written to ``path``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.PatientName, ds.PatientID = "TEST^BIG", "BIG001"
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "t2_tse_tra", 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(rows * cols * 2)
    ds.save_as(path, enforce_file_format=True)
    return path


def sender(port: int, calling: str = "BIGSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = 0  # our own maximum unlimited: the PDU size is the node's to set
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 120, 300, 300
    ae.add_requested_context(MR, [ExplicitVRLittleEndian])
    return ae


@pytest.fixture
def node(tmp_path: Path):
    n = NodeProcess(tmp_path / "data", serve_worker="none", min_free_disk_mb=10).start()
    yield n
    n.stop()


def test_64mib_instance_from_an_unlimited_sender_keeps_memory_flat(node: NodeProcess, tmp_path: Path) -> None:
    path = big_mr(tmp_path / "big.dcm", 4096, 8192)  # 64 MiB of pixels
    size = path.stat().st_size
    assert node.proc is not None
    assoc = sender(node.port).associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 1048576  # the node's default max_pdu, advertised
    before = vm_hwm(node.proc.pid)
    status = int(assoc.send_c_store(path).Status)
    after = vm_hwm(node.proc.pid)
    assoc.release()
    path.unlink()
    print(f"\nlistener peak RSS {(after - before) / MIB:+.1f} MiB for a {size / MIB:.0f} MiB instance "
          f"(VmHWM {before / MIB:.0f} -> {after / MIB:.0f} MiB)")
    assert status == 0
    assert after - before < size // 4, "the listener buffered a sizeable part of the instance"
    assert len(node.spool_files()) == 1


def test_pdu_over_our_maximum_is_aborted_unread(node: NodeProcess) -> None:
    assert node.proc is not None
    assoc = sender(node.port, "LIAR").associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    before = vm_hwm(node.proc.pid)
    cx = assoc.accepted_contexts[0].context_id
    sock = assoc.dul.socket.socket
    gib = 1 << 30
    # a P-DATA-TF header announcing 1 GiB, one PDV item header, and the first 64 KiB
    sock.sendall(struct.pack(">BBI", 0x04, 0, gib) + struct.pack(">IBB", gib - 4, cx, 0x00) + bytes(65536))
    deadline = time.monotonic() + 60
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted, "the node did not abort the association"
    after = vm_hwm(node.proc.pid)
    print(f"\nlistener peak RSS {(after - before) / MIB:+.1f} MiB for a PDU announcing 1 GiB")
    assert after - before < 16 * MIB
    events = json.loads(node.cli("events", "--json").stdout)
    aborted = [e["message"] for e in events if e["kind"] == "association_aborted"]
    assert any("announces 1073741824 bytes" in m and "'LIAR'" in m for m in aborted), aborted
    # the node goes on serving
    ok = sender(node.port).associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert ok.is_established
    ok.release()


def test_oversized_associate_request_is_aborted_unread(node: NodeProcess) -> None:
    """Before any association: an A-ASSOCIATE-RQ announcing 2 GiB gets an A-ABORT and the connection closed."""
    import socket

    with socket.create_connection(("127.0.0.1", node.port), timeout=60) as s:
        s.sendall(struct.pack(">BBI", 0x01, 0, 0x7FFFFFFF) + bytes(1024))
        received = b""
        while chunk := s.recv(4096):
            received += chunk
    # A-ABORT: type 7, length 4, source 2 (service provider), reason 6 (invalid PDU parameter value); then EOF
    assert received == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])
