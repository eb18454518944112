"""Ingest speed: 200 MR instances of 512x512, node vs dcmtk storescp, over 1 and over 4 parallel associations.

    python benchmarks/ingest.py [--rounds 5] [--instances 200] [--json]

Every measurement sends with dcmtk's storescu (both sides with TCP_NODELAY=1,
as the field notes require for dcmtk on loopback). The receivers, all running
for the whole run:

- the node as `dicomnode serve` on its embedded default (the in-process
  Celery worker running in the same process), fsync on: its default and the
  only durable mode;
- the same with fsync off, for reference (single association only): what
  durability costs;
- dcmtk `storescp +B` (files written bit-preserving, never fsynced): one
  process for the single association, and a second one with `--fork` (a
  process per association) for the parallel sends, since without it storescp
  serves associations one after the other.

Each round sends a fresh set of instances (new UIDs: the node would otherwise
answer from its duplicate path) to each receiver, alternating: one
association with all of them, then four storescu processes at once with a
quarter each. Medians over the rounds, the ratios node/storescp, and the
node's speed-up from 1 to 4 associations are printed. Before the rounds the
node is left to go idle (its worker warms up in the background after the
port opens) and gets a small warm-up send, so round 1 measures the listener
and not a torch import.

The host is shared: the load average is printed at the start and the end, and
so is the median time of one fsync of a 512 KiB file on the disk the node
writes to, which bounds what a durable acknowledgement can cost there.

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

from dicomnode.dicom.sop import MR_IMAGE_STORAGE

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
NODE_AET = "BENCHNODE"
PARALLEL = 4


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
        ds.SOPClassUID = MR_IMAGE_STORAGE
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


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
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


def _storescu(files: list[Path], port: int, aec: str) -> subprocess.Popen[str]:
    return subprocess.Popen([STORESCU, "-aet", "BENCHSCU", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def send(files: list[Path], port: int, aec: str, associations: int = 1) -> float:
    """Wall time for ``associations`` storescu processes, started together, to send ``files`` between them."""
    parts = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [_storescu(part, port, aec) for part in parts if part]
    outputs = [p.communicate()[0] for p in procs]
    dt = time.perf_counter() - t0
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {out}")
    return dt


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_idle(pid: int, quiet_s: float = 2.0, timeout_s: float = 300.0) -> float:
    """Seconds until the process used under 5 % of a core for ``quiet_s`` (its background warm-up is over)."""
    t0 = last_busy = time.time()
    ticks = cpu_ticks(pid)
    hz = os.sysconf("SC_CLK_TCK")
    while time.time() - t0 < timeout_s:
        time.sleep(0.5)
        now = cpu_ticks(pid)
        if (now - ticks) / hz > 0.025:
            last_busy = time.time()
        ticks = now
        if time.time() - last_busy >= quiet_s:
            break
    return time.time() - t0


def fsync_ms(directory: Path, n: int = 20) -> float:
    """Median ms to fsync a freshly written 512 KiB file in ``directory`` (the disk's flush latency, now)."""
    data = os.urandom(512 * 1024)
    times = []
    for k in range(n):
        p = directory / f"fsync-probe-{k}"
        with open(p, "wb") as fh:
            fh.write(data)
            fh.flush()
            t0 = time.perf_counter()
            os.fsync(fh.fileno())
            times.append(time.perf_counter() - t0)
        p.unlink()
    return statistics.median(times) * 1000


class Node:
    def __init__(self, data: Path, fsync: bool) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env.update({
            "DICOMNODE_AE_TITLE": NODE_AET, "DICOMNODE_PORT": str(self.port), "DICOMNODE_DATA_DIR": str(data),
            "DICOMNODE_FSYNC": "true" if fsync else "false", "DICOMNODE_MIN_FREE_DISK_MB": "100",
            "DICOMNODE_QUIET_PERIOD_S": "3600", "DICOMNODE_LOG_LEVEL": "ERROR",
        })
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode", "serve"], env=env)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class StoreSCP:
    def __init__(self, out: Path, fork: bool) -> None:
        self.port = free_port()
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([STORESCP, *(["--fork"] if fork else []), "-aet", "STORESCP", "+B", "-od",
                                      str(out), str(self.port)], env={**os.environ, "TCP_NODELAY": "1"})
        wait_port(self.port, self.proc)

    def clear(self) -> None:
        for p in self.out.iterdir():
            p.unlink()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


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
    n = args.instances
    try:
        load_start = load()
        print(f"{os.cpu_count()} CPUs, load average {load_start}; generating {args.rounds} x 2 x {n} "
              f"MR instances 512x512 ...", flush=True)
        one = [make_instances(work / f"one{r}", n) for r in range(args.rounds)]
        four = [make_instances(work / f"four{r}", n) for r in range(args.rounds)]
        mb = sum(p.stat().st_size for p in one[0]) / 2**20
        node = Node(work / "node-fsync", fsync=True)
        node_nofsync = Node(work / "node-nofsync", fsync=False)
        scp = StoreSCP(work / "storescp", fork=False)
        scp_fork = StoreSCP(work / "storescp-fork", fork=True)
        warm = make_instances(work / "warm", 10)
        idle_s = max(wait_idle(node.proc.pid), wait_idle(node_nofsync.proc.pid))
        for port, aec in ((node.port, NODE_AET), (node_nofsync.port, NODE_AET), (scp.port, "STORESCP"),
                          (scp_fork.port, "STORESCP")):
            send(warm, port, aec)
        scp.clear()
        scp_fork.clear()
        print(f"nodes idle {idle_s:.0f} s after their ports opened (background warm-up); warm-up sends done",
              flush=True)
        t = {k: [] for k in ("scp1", "node1", "nofsync1", "scp4", "node4")}
        hwm = []
        for r in range(args.rounds):
            t["scp1"].append(send(one[r], scp.port, "STORESCP"))
            scp.clear()
            t["node1"].append(send(one[r], node.port, NODE_AET))
            t["nofsync1"].append(send(one[r], node_nofsync.port, NODE_AET))
            t["scp4"].append(send(four[r], scp_fork.port, "STORESCP", PARALLEL))
            scp_fork.clear()
            t["node4"].append(send(four[r], node.port, NODE_AET, PARALLEL))
            hwm.append(vm_hwm_mb(node.proc.pid))
            print(f"round {r + 1}: 1 assoc: storescp {t['scp1'][-1]:.3f}s node {t['node1'][-1]:.3f}s "
                  f"(no fsync {t['nofsync1'][-1]:.3f}s) | {PARALLEL} assoc: storescp {t['scp4'][-1]:.3f}s "
                  f"node {t['node4'][-1]:.3f}s | node VmHWM {hwm[-1]:.1f} MB | load {load()}", flush=True)
        flush_ms = fsync_ms(work / "node-fsync")
        big = make_instances(work / "big", 1, frames=256)  # one 128 MiB instance
        t_big = send(big, node.port, NODE_AET)
        hwm_big = vm_hwm_mb(node.proc.pid)
        node.stop()
        node_nofsync.stop()
        scp.stop()
        scp_fork.stop()
        m = {k: statistics.median(v) for k, v in t.items()}
        figures = {
            "instances": n, "megabytes": round(mb, 1), "rounds": args.rounds, "parallel": PARALLEL,
            "cpus": os.cpu_count(), "load_start": load_start, "load_end": load(), "fsync_512KiB_ms": round(flush_ms, 2),
            "storescp_1_median_s": round(m["scp1"], 3), "node_1_median_s": round(m["node1"], 3),
            "node_nofsync_1_median_s": round(m["nofsync1"], 3),
            "storescp_4_median_s": round(m["scp4"], 3), "node_4_median_s": round(m["node4"], 3),
            "ratio_node_vs_storescp_1": round(m["node1"] / m["scp1"], 2),
            "ratio_node_nofsync_vs_storescp_1": round(m["nofsync1"] / m["scp1"], 2),
            "ratio_node_vs_storescp_4": round(m["node4"] / m["scp4"], 2),
            "node_speedup_4_vs_1": round(m["node1"] / m["node4"], 2),
            "node_instances_per_s_1": round(n / m["node1"], 1), "node_instances_per_s_4": round(n / m["node4"], 1),
            "node_vmhwm_mb_after_round1": round(hwm[0], 1), "node_vmhwm_mb_after_all_rounds": round(hwm[-1], 1),
            "node_vmhwm_mb_after_128MiB_instance": round(hwm_big, 1), "big_instance_s": round(t_big, 3),
        }
        print()
        print(f"{n} instances ({mb:.0f} MB), median of {args.rounds} rounds; load average {load_start} at the start, "
              f"{figures['load_end']} at the end; one fsync of 512 KiB here: {flush_ms:.2f} ms")
        print(f"  one association:   storescp {m['scp1']:.3f} s   node {m['node1']:.3f} s   "
              f"ratio {m['node1'] / m['scp1']:.2f}")
        print(f"  {PARALLEL} associations:    storescp --fork {m['scp4']:.3f} s   node {m['node4']:.3f} s   "
              f"ratio {m['node4'] / m['scp4']:.2f}")
        print(f"  node, {PARALLEL} associations vs one: {m['node1'] / m['node4']:.2f}x faster")
        print(f"  node with fsync off (reference, one association): {m['nofsync1']:.3f} s   "
              f"ratio {m['nofsync1'] / m['scp1']:.2f}")
        print(f"  listener peak RSS: {hwm[0]:.1f} MB after {2 * n} instances, {hwm[-1]:.1f} MB after "
              f"{2 * n * args.rounds}, {hwm_big:.1f} MB after one 128 MiB instance")
        if args.json:
            print(json.dumps(figures))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
