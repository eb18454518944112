"""Ingest speed: 200 MR instances of 512x512 over one association, node vs dcmtk storescp.

    python benchmarks/ingest.py [--rounds 5] [--instances 200]

Both receivers get the same files from dcmtk's storescu (one association, both
sides with TCP_NODELAY=1, as the field notes require for dcmtk on loopback), in
the same run, alternating, several rounds; medians and the ratio are printed.
The node runs as `dicomnode serve` with fsync on (its default and the only
durable mode); a no-fsync round set shows what durability costs. storescp
writes files bit-preserving (+B) and never fsyncs.

Also prints the listener's peak RSS (VmHWM) after one round, after all rounds
(growth with the number of instances) and after one 128 MiB multi-frame
instance (growth with instance size).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
NODE_AET = "BENCHNODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_instances(out: Path, n: int, rows: int = 512, cols: int = 512, frames: int = 1) -> list[Path]:
    """n MR instances (classic when frames=1) with random 12-bit pixels and fresh UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    pixels = rng.integers(0, 4096, size=(frames, rows, cols), dtype=np.uint16).tobytes()
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID = "BENCH^INGEST", "BENCH"
        ds.SeriesDescription = "t2_tse_tra"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Rows, ds.Columns = rows, cols
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        p = out / f"{k:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("receiver did not listen")


def send(files: list[Path], port: int, aec: str) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([STORESCU, "-aet", "BENCHSCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                       env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stdout}{r.stderr}")
    return dt


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Node:
    def __init__(self, data: Path, fsync: bool) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env.update({
            "DICOMNODE_AE_TITLE": NODE_AET, "DICOMNODE_PORT": str(self.port), "DICOMNODE_DATA_DIR": str(data),
            "DICOMNODE_FSYNC": "true" if fsync else "false", "DICOMNODE_MIN_FREE_DISK_MB": "100",
            "DICOMNODE_QUIET_PERIOD_S": "3600", "DICOMNODE_LOG_LEVEL": "WARNING",
        })
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve"], env=env)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


class StoreSCP:
    def __init__(self, out: Path) -> None:
        self.port = free_port()
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([STORESCP, "-aet", "STORESCP", "+B", "-od", str(out), str(self.port)],
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            sys.exit(f"{tool} missing: apt-get install dcmtk")
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        print(f"generating {args.rounds} x {args.instances} MR instances 512x512 ...", flush=True)
        sets = [make_instances(work / f"src{r}", args.instances) for r in range(args.rounds)]
        mb = sum(p.stat().st_size for p in sets[0]) / 2**20
        node_fsync = Node(work / "node-fsync", fsync=True)
        node_nofsync = Node(work / "node-nofsync", fsync=False)
        t_scp, t_node, t_nofsync, hwm = [], [], [], []
        for r, files in enumerate(sets):
            scp = StoreSCP(work / f"storescp{r}")
            t_scp.append(send(files, scp.port, "STORESCP"))
            scp.stop()
            shutil.rmtree(work / f"storescp{r}")
            t_node.append(send(files, node_fsync.port, NODE_AET))
            t_nofsync.append(send(files, node_nofsync.port, NODE_AET))
            hwm.append(vm_hwm_mb(node_fsync.proc.pid))
            print(f"round {r + 1}: storescp {t_scp[-1]:.3f}s  node(fsync) {t_node[-1]:.3f}s  "
                  f"node(no fsync) {t_nofsync[-1]:.3f}s  node VmHWM {hwm[-1]:.1f} MB", flush=True)
        big = make_instances(work / "big", 1, frames=256)  # one 128 MiB instance
        t_big = send(big, node_fsync.port, NODE_AET)
        hwm_big = vm_hwm_mb(node_fsync.proc.pid)
        node_fsync.stop()
        node_nofsync.stop()
        m_scp, m_node, m_nof = map(statistics.median, (t_scp, t_node, t_nofsync))
        figures = {
            "instances": args.instances, "megabytes": round(mb, 1), "rounds": args.rounds,
            "storescp_median_s": round(m_scp, 3), "node_fsync_median_s": round(m_node, 3),
            "node_nofsync_median_s": round(m_nof, 3), "ratio_node_fsync_vs_storescp": round(m_node / m_scp, 2),
            "ratio_node_nofsync_vs_storescp": round(m_nof / m_scp, 2),
            "node_instances_per_s": round(args.instances / m_node, 1),
            "node_vmhwm_mb_after_round1": round(hwm[0], 1), "node_vmhwm_mb_after_all_rounds": round(hwm[-1], 1),
            "node_vmhwm_mb_after_128MiB_instance": round(hwm_big, 1), "big_instance_s": round(t_big, 3),
        }
        print()
        print(f"{args.instances} instances ({mb:.0f} MB), one association, median of {args.rounds} rounds:")
        print(f"  dcmtk storescp (TCP_NODELAY=1, +B, no fsync): {m_scp:.3f} s")
        print(f"  dicomnode (fsync on):                         {m_node:.3f} s  ratio {m_node / m_scp:.2f}")
        print(f"  dicomnode (fsync off, for reference):         {m_nof:.3f} s  ratio {m_nof / m_scp:.2f}")
        print(f"  listener peak RSS: {hwm[0]:.1f} MB after {args.instances} instances, {hwm[-1]:.1f} MB after "
              f"{args.instances * args.rounds}, {hwm_big:.1f} MB after one 128 MiB instance")
        if args.json:
            print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
