"""Association slots against a real listener: idle sockets and stalled associations do not lock peers out.

Raw bytes where a misbehaving peer is needed: a pynetdicom association whose
test side then writes a C-STORE-RQ and the first fragment of its data set
straight onto the socket, and stops (the node sees a peer stalled
mid-dataset); plain TCP connections that never send an A-ASSOCIATE-RQ.

No timing margins: the new peer must be served while the stalled
associations are still open (the stall timeout is set far beyond the test),
which shows the node did not just wait for them to time out; the measured
time to serve is printed (``pytest -s``).
"""
from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from nodeutil import MR, NODE_AET, NodeProcess, wait_until
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

IDLE, STALLED = 50, 16


def store_rq_command(sop_instance: str) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, group length first) announcing a data set."""
    ds = Dataset()
    ds.AffectedSOPClassUID = MR
    ds.CommandField = 0x0001
    ds.MessageID = 1
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_instance
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def p_data_tf(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (control: bit 0 command, bit 1 last fragment)."""
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def peer(port: int, calling: str) -> Any:
    """An association as a client that never times out by itself."""
    ae = AE(ae_title=calling)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 120, 120, None
    ae.add_requested_context(MR, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET)


def stall(assoc: Any) -> None:
    """Send a C-STORE-RQ and the first 4 KiB of its data set (not the last fragment), then nothing more."""
    cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == MR)
    sock = assoc.dul.socket.socket
    sock.sendall(p_data_tf(cx, 0x03, store_rq_command(generate_uid())))
    sock.sendall(p_data_tf(cx, 0x00, b"\x08\x00\x16\x00UI\x1a\x00" + b"1" * 4086))


def is_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def echo(port: int, calling: str = "NEWPEER") -> tuple[Any, int | None]:
    assoc = peer(port, calling)
    if not assoc.is_established:
        return assoc, None
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return assoc, status


def events(node: NodeProcess) -> list[dict[str, Any]]:
    return list(json.loads(node.cli("events", "--json").stdout))


@pytest.fixture
def patient_node(tmp_path: Path):
    """Defaults for slots, timeouts far beyond the test: whatever is served is served while the others stall."""
    n = NodeProcess(tmp_path / "data", serve_worker="none", artim_timeout_s=600, stall_timeout_s=600,
                    network_timeout_s=600).start()
    yield n
    n.stop()


def test_new_peer_served_while_idle_sockets_and_stalled_associations_hold_on(patient_node: NodeProcess) -> None:
    port = patient_node.port
    stalled = [peer(port, f"STALL{k:02d}") for k in range(STALLED)]  # many peers: one slot each
    assert all(a.is_established for a in stalled)
    for a in stalled:
        stall(a)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
    try:
        t0 = time.perf_counter()
        assoc, status = echo(port)
        served_s = time.perf_counter() - t0
        print(f"\nnew peer served (A-ASSOCIATE + C-ECHO + A-RELEASE) in {served_s:.3f} s with {IDLE} idle sockets "
              f"and {STALLED} stalled associations open")
        assert status == 0, f"new peer not served: rejected={assoc.is_rejected}"
        # ... and at that moment nothing had been dropped to make room
        assert sum(a.is_established for a in stalled) == STALLED
        assert sum(is_open(s) for s in idle) == IDLE
        assert list((patient_node.data_dir / "spool" / "tmp").glob("*.dcm")), "stalled data sets are being streamed"
    finally:
        for a in stalled:
            a.abort()
        for s in idle:
            s.close()


def test_one_peer_cannot_take_every_slot(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", serve_worker="none", max_associations=6, max_associations_per_peer=4,
                       stall_timeout_s=600, network_timeout_s=600).start()
    held: list[Any] = []
    try:
        port = node.port
        for _ in range(6):
            held.append(peer(port, "GREEDY"))
        accepted = [a for a in held if a.is_established]
        refused = [a for a in held if not a.is_established]
        assert len(accepted) == 4 and len(refused) == 2
        for a in refused:
            assert a.is_rejected
            rj = a.acceptor.primitive
            assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        for a in accepted:
            stall(a)
        # the same AE title from another address would be another peer; another AE title here is one
        _, status = echo(port, "OTHER")
        assert status == 0
        assert all(a.is_established for a in accepted)
        # the total still holds: 4 + 2 others fill the 6 slots, the next one is refused whoever it is
        held += [peer(port, "OTHER1"), peer(port, "OTHER2")]
        assert held[-1].is_established and held[-2].is_established
        extra = peer(port, "OTHER3")
        assert extra.is_rejected
        assert (extra.acceptor.primitive.result, extra.acceptor.primitive.diagnostic) == (0x02, 0x02)
        rejected = [e["message"] for e in events(node) if e["kind"] == "association_rejected"]
        assert sum("max_associations_per_peer" in m and "'GREEDY'" in m for m in rejected) == 2
        assert sum("(max_associations)" in m and "'OTHER3'" in m for m in rejected) == 1
        # a slot comes back when its association ends
        held[-1].release()
        wait_until(lambda: echo(port, "OTHER3")[1] == 0, 300, what="a released slot is taken again")
    finally:
        for a in held:
            if a.is_established:
                a.abort()
        node.stop()


def test_stalled_association_dropped_after_stall_timeout_and_its_file_removed(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", serve_worker="none", stall_timeout_s=1).start()
    try:
        a = peer(node.port, "SLOWPOKE")
        assert a.is_established
        stall(a)
        wait_until(lambda: not a.is_established, 300, what="the node aborts the stalled association")
        assert a.is_aborted
        tmp = node.data_dir / "spool" / "tmp"
        wait_until(lambda: not list(tmp.glob("*.dcm")), 300, what="its partial data set file is removed")
        aborted = [e["message"] for e in events(node) if e["kind"] == "association_aborted"]
        assert any("stalled peer" in m and "'SLOWPOKE'" in m for m in aborted), aborted
        assert echo(node.port)[1] == 0
    finally:
        node.stop()


def test_idle_socket_closed_after_artim(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", serve_worker="none", artim_timeout_s=1).start()
    try:
        s = socket.create_connection(("127.0.0.1", node.port))
        wait_until(lambda: not is_open(s), 300, what="a connection without A-ASSOCIATE-RQ is closed after ARTIM")
        s.close()
        assert echo(node.port)[1] == 0
    finally:
        node.stop()


def test_slot_settings_are_validated() -> None:
    from dicomnode.config import SettingsError, load_settings

    for env in ({"DICOMNODE_MAX_ASSOCIATIONS_PER_PEER": "0"}, {"DICOMNODE_ARTIM_TIMEOUT_S": "0"},
                {"DICOMNODE_STALL_TIMEOUT_S": "200"},  # over network_timeout_s (120)
                {"DICOMNODE_MAX_PDU": "1000"}):
        with pytest.raises(SettingsError):
            load_settings(environ=env)
    s = load_settings(environ={"DICOMNODE_MAX_PDU": "0", "DICOMNODE_MAX_ASSOCIATIONS": "2"})
    assert s.max_pdu == 0 and s.max_associations_per_peer == 8  # above max_associations: the total bounds it
