"""Listener memory for one huge instance: peak RSS growth of `dicomnode serve` receiving 512 MiB.

    python benchmarks/bigmem.py [--mib 512] [--node-setting NAME=VALUE ...] [--json]

Generates one MR instance of 16384 x 16384 16-bit pixels (512 MiB; `--mib`
scales the rows) into a temporary file, then for each sender starts a fresh
`dicomnode serve` (embedded worker off, so that a torch import does not move
the peak), lets it answer one C-ECHO, reads its peak RSS (VmHWM in
/proc/<pid>/status), sends the instance once and reads VmHWM again:

- pynetdicom with `maximum_pdu_size = 0` on the sender (it sends PDUs as long
  as the node's advertised maximum allows: with the old `max_pdu = 0`, the
  whole data set in one PDU);
- dcmtk `storescu` (its own PDU size).

`--node-setting max_pdu=0` reproduces the old default. Temporary files go
under the system temp directory (1.1 GiB for the instance and its stored
copy) and are removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode.dicom.shim import configure

STORESCU = "/usr/bin/storescu"
MR = "1.2.840.10008.5.1.4.1.1.4"
NODE_AET = "BENCHNODE"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def make_instance(path: Path, mib: int) -> Path:
    """One MR instance of (mib * 32) x 16384 16-bit pixels: ``mib`` MiB of pixel data."""
    rows, cols = mib * 32, 16384
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "MR"
    ds.PatientName, ds.PatientID = "BENCH^BIGMEM", "BIGMEM"
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "t2_tse_tra", 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(rows * cols * 2)
    ds.save_as(path, enforce_file_format=True)
    return path


class Node:
    def __init__(self, work: Path, name: str, settings: list[str]) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env.update({"DICOMNODE_AE_TITLE": NODE_AET, "DICOMNODE_PORT": str(self.port),
                    "DICOMNODE_DATA_DIR": str(work / name), "DICOMNODE_MIN_FREE_DISK_MB": "10",
                    "DICOMNODE_SERVE_WORKER": "none", "DICOMNODE_LOG_LEVEL": "WARNING"})
        for item in settings:
            key, _, value = item.partition("=")
            env["DICOMNODE_" + key.upper()] = value
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "wb"))
        deadline = time.time() + 60
        while not self.echo():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"node did not start: see {work / name}.log")
            time.sleep(0.2)

    def echo(self) -> bool:
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(Verification)
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AET)
        except Exception:
            return False
        if not assoc.is_established:
            return False
        ok = int(assoc.send_c_echo().Status) == 0
        assoc.release()
        return ok

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def send_pynetdicom(path: Path, port: int) -> tuple[bool, float]:
    configure()  # STORE_SEND_CHUNKED_DATASET: the sender streams the file, as the node's own sender does
    ae = AE(ae_title="BENCHSCU")
    ae.maximum_pdu_size = 0
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 120, 600, 600
    ae.add_requested_context(MR, [ExplicitVRLittleEndian])
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        return False, 0.0
    rsp = assoc.send_c_store(path)
    ok = bool(rsp) and int(rsp.Status) == 0
    assoc.release()
    return ok, time.perf_counter() - t0


def send_storescu(path: Path, port: int) -> tuple[bool, float]:
    t0 = time.perf_counter()
    done = subprocess.run([STORESCU, "-aet", "BENCHSCU", "-aec", NODE_AET, "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=900)
    return done.returncode == 0, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--node-setting", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {"instance_mib": args.mib, "node_settings": args.node_setting}
    with tempfile.TemporaryDirectory(prefix="bigmem-") as tmp:
        work = Path(tmp)
        path = make_instance(work / "big.dcm", args.mib)
        results["file_mib"] = round(path.stat().st_size / MIB, 1)
        for name, send in (("pynetdicom_pdu0", send_pynetdicom), ("storescu", send_storescu)):
            node = Node(work, name, args.node_setting)
            try:
                before = vm_hwm(node.proc.pid)
                ok, seconds = send(path, node.port)
                after = vm_hwm(node.proc.pid)
            finally:
                node.stop()
            results[name] = {"stored": ok, "seconds": round(seconds, 2), "vmhwm_before_mb": round(before / 1e6),
                             "vmhwm_after_mb": round(after / 1e6),
                             "peak_rss_delta_mb": round((after - before) / 1e6, 1)}
    if args.json:
        print(json.dumps(results))
    else:
        print(f"one {results['file_mib']} MiB MR instance; node settings {args.node_setting or 'defaults'}")
        for name in ("pynetdicom_pdu0", "storescu"):
            r = results[name]
            print(f"  {name:16s} stored={r['stored']} in {r['seconds']:.1f} s; listener peak RSS "
                  f"{r['vmhwm_before_mb']} -> {r['vmhwm_after_mb']} MB ({r['peak_rss_delta_mb']:+.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
