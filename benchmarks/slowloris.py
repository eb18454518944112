"""Slot lock-out: how long a new peer waits while 50 idle sockets and 16 stalled associations are open.

    python benchmarks/slowloris.py [--idle 50] [--stalled 16] [--one-peer] [--max-wait 240] [--json]
                                   [--node-setting NAME=VALUE ...]

Against `dicomnode serve` (its defaults, embedded worker off so that a torch
import does not share the two cores) and dcmtk `storescp --fork` (a process
per association; without `--fork` storescp serves one association at a time,
and the first stalled one would hold it for good), both started in this run:

1. 16 associations that stall mid-dataset: a C-STORE-RQ whose command set is
   complete and whose data set stops after its first fragment (a P-DATA-TF
   PDU with a data set PDV that is not the last); the peer then sends nothing.
   From 16 calling AE titles (many peers), or one (`--one-peer`).
2. 50 TCP connections that never send an A-ASSOCIATE-RQ.
3. A new peer (another calling AE title) tries A-ASSOCIATE + C-ECHO every
   0.2 s; the time from its first try to its first C-ECHO Success is printed,
   and whether the stalled associations were still open at that moment.

`--node-setting` passes DICOMNODE_* settings to the node, e.g. the old
defaults `max_associations=16 artim_timeout_s=30 stall_timeout_s=120` (each
only if the node knows it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

STORESCP = "/usr/bin/storescp"
MR = "1.2.840.10008.5.1.4.1.1.4"
NODE_AET = "BENCHNODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def store_rq_command(sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, group length first) announcing a data set."""
    ds = Dataset()
    ds.AffectedSOPClassUID = MR
    ds.CommandField = 0x0001
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = sop_instance
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def p_data_tf(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV item (control: bit 0 command, bit 1 last fragment)."""
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def stall(port: int, calling: str, called: str) -> Any:
    """An association that stops sending mid-dataset; returns it (established) or None if refused."""
    ae = AE(ae_title=calling)
    ae.network_timeout = None  # the stalling side never gives up by itself (pynetdicom's default would at 60 s)
    ae.add_requested_context(MR, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    cx = assoc.accepted_contexts[0].context_id
    sock = assoc.dul.socket.socket
    sock.sendall(p_data_tf(cx, 0x03, store_rq_command(generate_uid())))
    # the data set's first 4 KiB (any bytes: the peer never finishes it), not the last fragment
    sock.sendall(p_data_tf(cx, 0x00, b"\x08\x00\x16\x00UI\x1a\x00" + b"1" * 4086))
    return assoc


def echo_once(port: int, called: str, calling: str = "NEWPEER") -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 30
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def is_open(sock: socket.socket) -> bool:
    """The peer has not closed this connection (nothing to read, or data waiting)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def wait_listening(port: int, called: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            if echo_once(port, called, "WARMUP"):
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError("receiver did not answer C-ECHO")


def attack_and_time(port: int, called: str, idle: int, stalled: int, one_peer: bool, max_wait: float) -> dict[str, Any]:
    assocs = []
    for k in range(stalled):
        a = stall(port, "STALLER" if one_peer else f"STALL{k:02d}", called)
        if a is not None:
            assocs.append(a)
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
    time.sleep(0.5)  # let the receiver take them all in
    t0 = time.perf_counter()
    served = None
    tries = 0
    while time.perf_counter() - t0 < max_wait:
        tries += 1
        try:
            if echo_once(port, called):
                served = time.perf_counter() - t0
                break
        except Exception:
            pass
        time.sleep(0.2)
    still_stalled = sum(a.is_established for a in assocs)
    still_idle = sum(is_open(s) for s in sockets)
    for a in assocs:
        a.abort()
    for s in sockets:
        s.close()
    return {"stalled_established": len(assocs), "served_after_s": None if served is None else round(served, 3),
            "tries": tries, "stalled_still_open": still_stalled, "idle_still_open": still_idle}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=50)
    ap.add_argument("--stalled", type=int, default=16)
    ap.add_argument("--one-peer", action="store_true", help="all stalled associations from one calling AE title")
    ap.add_argument("--max-wait", type=float, default=240.0)
    ap.add_argument("--node-setting", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="slowloris-") as tmp:
        work = Path(tmp)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env.update({"DICOMNODE_AE_TITLE": NODE_AET, "DICOMNODE_PORT": str(port),
                    "DICOMNODE_DATA_DIR": str(work / "node"), "DICOMNODE_MIN_FREE_DISK_MB": "10",
                    "DICOMNODE_SERVE_WORKER": "none", "DICOMNODE_LOG_LEVEL": "ERROR"})
        for item in args.node_setting:
            name, _, value = item.partition("=")
            env["DICOMNODE_" + name.upper()] = value
        node = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve"], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(work / "node.log", "wb"))
        scp_port = free_port()
        (work / "scp").mkdir()
        scp = subprocess.Popen([STORESCP, "--fork", "-aet", "STORESCP", "-od", str(work / "scp"), str(scp_port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, NODE_AET, node)
            wait_listening(scp_port, "STORESCP", scp)
            results["node"] = attack_and_time(port, NODE_AET, args.idle, args.stalled, args.one_peer, args.max_wait)
            results["storescp_fork"] = attack_and_time(scp_port, "STORESCP", args.idle, args.stalled, args.one_peer,
                                                       args.max_wait)
        finally:
            node.send_signal(signal.SIGTERM)
            scp.terminate()
            for p in (node, scp):
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    results["load_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{args.idle} idle sockets + {args.stalled} stalled associations "
              f"({'one peer' if args.one_peer else 'one per calling AE'}), load {results['load_start']:.1f}"
              f"-{results['load_end']:.1f}")
        for name in ("node", "storescp_fork"):
            r = results[name]
            served = "never" if r["served_after_s"] is None else f"{r['served_after_s']:.3f} s"
            print(f"  {name:14s} new peer served after {served} ({r['tries']} tries); stalled accepted "
                  f"{r['stalled_established']}, still open then {r['stalled_still_open']}; idle still open "
                  f"{r['idle_still_open']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
