"""Start-up: from spawning `dicomnode serve` to its first answered C-ECHO, vs dcmtk `storescp`.

    python benchmarks/startup.py [--rounds 7]

Each round spawns `python -m dicomnode serve` (embedded mode, the default; a
fresh data directory every time, so nothing is cached in the index or the
spool) and dcmtk's `storescp` (`TCP_NODELAY=1`, as the field notes require),
alternating, and measures the wall time from spawn to the first C-ECHO that
returns status 0x0000 (pynetdicom, polling every 20 ms; the poller's imports
are paid before the clock starts). Prints the median and the max of each, the
ratio node/storescp, and the CPU time of the serve process's main thread when
the port answered (its path to listening; about the wall time on an idle host,
whatever the load of the host running the benchmark). The target is a node
listening within 2 s of its start on an idle two-core machine; on a loaded one
every figure grows, which is why the peer runs in the same rounds.

It also says, for each node round, whether torch was mapped into the serve
process (``libtorch`` in ``/proc/<pid>/maps``) at the moment the port answered:
the embedded worker imports torch only in the background, after listening,
and the listener must never wait for it. A few seconds later (``--settle``) it
looks again, to show the warm-up did load it in the background.
"""
from __future__ import annotations

import argparse
import logging
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

from pynetdicom import AE
from pynetdicom.sop_class import Verification

REPO = Path(__file__).resolve().parent.parent
STORESCP = "/usr/bin/storescp"
NODE_AET = "BENCHNODE"
PEER_AET = "STORESCP"
TARGET_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_once(port: int, called: str) -> bool:
    """One association with one C-ECHO; False while nobody listens (connection refused) or it is refused."""
    ae = AE(ae_title="STARTUPBENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return bool(rsp) and int(getattr(rsp, "Status", -1)) == 0
    finally:
        assoc.release()


def torch_mapped(pid: int) -> bool:
    """True when the process has torch's shared library mapped (i.e. it has imported torch)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def main_thread_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the process's main thread: in `dicomnode serve`, the path to listening.

    The main thread opens the port and then only waits; the listener's and the
    background start's threads are others. On an idle host the wall time to
    listening is about this (plus disk waits), whatever the load here.
    """
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NICE = 0  # --nice: the spawned servers' niceness (negative: ahead of other work on a shared host; needs root)


def _renice() -> None:
    if NICE:
        os.nice(NICE)


def spawn_to_echo(cmd: list[str], env: dict[str, str], port: int, called: str, timeout: float,
                  log: Path) -> tuple[float, subprocess.Popen[bytes]]:
    """Spawn ``cmd``; poll C-ECHO until it answers; return (seconds from spawn, the still-running process)."""
    with open(log, "ab") as logf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=logf, stderr=logf, preexec_fn=_renice)
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
        if echo_once(port, called):
            return time.perf_counter() - t0, proc
        time.sleep(0.02)
    stop(proc)
    raise TimeoutError(f"{' '.join(cmd)} did not answer C-ECHO within {timeout} s; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def node_round(work: Path, k: int, timeout: float, settle: float) -> tuple[float, float, bool, bool]:
    """(seconds to echo, main-thread CPU seconds, torch mapped at echo, torch mapped ``settle`` s later) for one
    fresh `dicomnode serve`."""
    port = free_port()
    data = work / f"node-{k}"
    env = {key: v for key, v in os.environ.items() if not key.startswith("DICOMNODE_")}
    env.update({"DICOMNODE_AE_TITLE": NODE_AET, "DICOMNODE_HOST": "127.0.0.1", "DICOMNODE_PORT": str(port),
                "DICOMNODE_DATA_DIR": str(data), "DICOMNODE_MIN_FREE_DISK_MB": "10",
                "DICOMNODE_LOG_LEVEL": "WARNING"})
    seconds, proc = spawn_to_echo([sys.executable, "-m", "dicomnode", "serve"], env, port, NODE_AET, timeout,
                                  work / "node.log")
    try:
        at_echo = torch_mapped(proc.pid)
        cpu = main_thread_cpu(proc.pid)
        deadline = time.perf_counter() + settle
        later = at_echo
        while not later and time.perf_counter() < deadline:
            time.sleep(0.25)
            later = torch_mapped(proc.pid)
    finally:
        stop(proc)
    return seconds, cpu, at_echo, later


def storescp_round(work: Path, k: int, timeout: float) -> float:
    port = free_port()
    out = work / f"storescp-{k}"
    out.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}
    seconds, proc = spawn_to_echo([STORESCP, "-aet", PEER_AET, "-od", str(out), str(port)], env, port, PEER_AET,
                                  timeout, work / "storescp.log")
    stop(proc)
    return seconds


def interpreter_floor(rounds: int) -> float:
    """Median seconds for a bare ``python -c pass`` (the floor no Python service can beat)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=120.0, help="give up on one start after this many seconds")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="after the echo, wait up to this long for torch to appear (the background warm-up)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data dirs)")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness of the spawned servers, both of them: e.g. -10 (root) to approximate an idle "
                         "host on a shared one, where the others' work would otherwise take most of the cores")
    args = ap.parse_args(argv)
    global NICE
    NICE = args.nice
    if not Path(STORESCP).exists():
        print(f"{STORESCP} not found (Debian package dcmtk)", file=sys.stderr)
        return 2
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # every refused poll would log an error
    work = Path(tempfile.mkdtemp(prefix="dicomnode-startup-"))
    node_s: list[float] = []
    node_cpu: list[float] = []
    peer_s: list[float] = []
    torch_at_echo: list[bool] = []
    torch_later: list[bool] = []
    try:
        floor = interpreter_floor(3)
        for k in range(args.rounds):
            s, cpu, at_echo, later = node_round(work, k, args.timeout, args.settle)
            node_s.append(s)
            node_cpu.append(cpu)
            torch_at_echo.append(at_echo)
            torch_later.append(later)
            peer_s.append(storescp_round(work, k, args.timeout))
            print(f"round {k + 1}/{args.rounds}: dicomnode serve {s:.2f} s (main thread {cpu:.2f} s CPU; "
                  f"torch at echo: {'YES' if at_echo else 'no'}, {args.settle:g} s later: {'yes' if later else 'no'}); "
                  f"storescp {peer_s[-1]:.3f} s", flush=True)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    n_med, n_max = statistics.median(node_s), max(node_s)
    p_med, p_max = statistics.median(peer_s), max(peer_s)
    print()
    print(f"host: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"bare `python -c pass`: {floor:.3f} s; servers' niceness {args.nice:+d}")
    print(f"dicomnode serve, spawn to C-ECHO: median {n_med:.2f} s, max {n_max:.2f} s (target <= {TARGET_S:g} s "
          f"on an idle 2-core host: {'met' if n_med <= TARGET_S else 'NOT met'} here)")
    print(f"dicomnode serve, main thread CPU to listening (about the wall time on an idle host): median "
          f"{statistics.median(node_cpu):.2f} s, max {max(node_cpu):.2f} s")
    print(f"dcmtk storescp,  spawn to C-ECHO: median {p_med:.3f} s, max {p_max:.3f} s")
    print(f"ratio node/storescp (medians): {n_med / p_med:.1f}x")
    print(f"torch loaded in the serve process when the port answered: "
          f"{sum(torch_at_echo)}/{len(torch_at_echo)} rounds"
          f"{' (WRONG: the listener waited for torch)' if any(torch_at_echo) else ''}; "
          f"loaded by the background warm-up within {args.settle:g} s after: {sum(torch_later)}/{len(torch_later)}")
    return 1 if any(torch_at_echo) else 0


if __name__ == "__main__":
    raise SystemExit(main())
