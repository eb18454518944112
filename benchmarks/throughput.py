"""Scale-out: studies per minute with one and with two `dicomnode worker` processes, and embedded.

    python benchmarks/throughput.py [--studies 8] [--rounds 2] [--shape 64 64 32] [--checkpoints DIR] [--oversubscribed]

Distributed mode as a site runs it: a `dicomnode serve` process (listener,
assembler, reconcile, dispatcher; no worker of its own) with a Redis broker
(a free database of the Redis on 127.0.0.1:6379, flushed afterwards), the
index on PostgreSQL (a fresh database on 127.0.0.1:5432, dropped afterwards),
a spool all processes share, and `dicomnode worker --queues cpu,gpu`
processes; dcmtk `storescp` (``TCP_NODELAY=1``) is the PACS the reports go to.
The embedded mode (one process, in-process worker, SQLite) runs the same
studies for comparison.

Each mode gets a fresh node. Distributed, in two phases, so that the clock
sees the workers drain a backlog and nothing else (see ``run_mode``): the
node first receives and completes every study with no worker running; then
the workers start and warm their stages (torch imported, checkpoints
validated: the "stages ... warmed" log line of every worker process), the
node starts again, and its start-up reconcile queues every version at once.
The clock runs from that reconcile to the last step finished (the index's
``jobs`` rows); studies/min = studies / that time. Embedded, the node (its
own worker) is warmed first and then receives the studies; its clock starts
at the first version completed. The CPU seconds the worker processes spent per study are printed
too: on a host shared with other work they show whether two workers cost more
per study than one (oversubscribed cores do) or only got less of the host.

Threads: with one worker process on this host, torch's pools keep the auto
size (usable cores // task slots); with two, each gets ``torch_threads`` =
cores // 2, as the settings reference says a host running several worker
processes must (auto cannot see the other process). ``--oversubscribed`` adds
a run of two workers left on auto, to show what that costs;
``--one-thread-baseline`` a run of one worker with one thread, to separate
the process scaling from the thread sizing.

Checkpoints: the tiny real checkpoints of the test suite by default
(tests/checkpoints.py: built in seconds, kept in ``--checkpoints``); the input
gate is loosened for them as in the end-to-end tests (they were made on
skull-stripped brains, the phantoms are whole heads). Target: two workers give
>= 1.9x the studies/min of one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import psycopg  # noqa: E402
import redis  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from dicomnode.dicom.scu import Destination, send  # noqa: E402
from dicomnode.runtime.runner import usable_cores  # noqa: E402
from dicomnode.synth import make_phantom, write_study  # noqa: E402
from nodeutil import LOOSE_GATE, free_port  # noqa: E402

NODE_AET = "BENCHNODE"
SINK_AET = "SINK"
STORESCP = "/usr/bin/storescp"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TARGET_RATIO = 1.9


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


@dataclass
class Result:
    mode: str
    studies: int
    seconds: float
    torch_threads: str
    steps: dict[str, float] = field(default_factory=dict)  # median seconds per step
    cpu_per_study: float = 0.0  # CPU seconds the worker processes (embedded: the node) spent per study

    @property
    def per_min(self) -> float:
        return 60.0 * self.studies / self.seconds


NICE = 0  # --nice: the node's and the workers' niceness (negative: ahead of other work on a shared host; root)


def _renice() -> None:
    if NICE:
        os.nice(NICE)


def spawn(name: str, args: list[str], env: dict[str, str], work: Path) -> Proc:
    log = work / f"{name}.log"
    with open(log, "ab") as fh:
        popen = subprocess.Popen(args, env=env, cwd=REPO, stdout=fh, stderr=fh, start_new_session=True,
                                 preexec_fn=_renice)
    return Proc(name, popen, log)


def wait_for(what: str, check: Any, timeout: float, procs: list[Proc], every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n"
                                   f"{p.text()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def node_env(settings: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    for k, v in settings.items():
        if v is not None:
            env["DICOMNODE_" + k.upper()] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return env


def make_studies(out: Path, n: int, shape: tuple[int, int, int]) -> list[Path]:
    dirs = []
    for k in range(n):
        d = out / f"study-{k}"
        volumes, affine = make_phantom(shape=shape, seed=100 + k, tumour=True, grade="HGG" if k % 2 else "LGG")
        write_study(volumes, affine, d, vendor=("siemens", "ge", "philips")[k % 3], seed=100 + k)
        dirs.append(d)
    return dirs


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    name = f"dicomnode_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def free_redis_db() -> Iterator[str]:
    """An empty database of the local Redis (highest number first), flushed afterwards."""
    for db in range(15, 0, -1):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        if client.dbsize() == 0:
            break
    else:
        raise RuntimeError("no empty Redis database on 127.0.0.1:6379")
    try:
        yield f"redis://127.0.0.1:6379/{db}"
    finally:
        client.flushdb()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants (a worker and its prefork children), the
    children it has already waited for included (e.g. a dcm2niix run)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(f) for f in fields[11:15]) / tick  # utime, stime, cutime, cstime
        children: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # gone
        return total
    return total + sum(tree_cpu(c) for c in children)


def count(engine: Any, sql: str) -> int:
    with engine.connect() as c:
        return int(c.execute(text(sql)).scalar() or 0)


def measure(engine: Any, n: int, timeout: float, procs: list[Proc], timeline: Path) -> tuple[float, dict[str, float]]:
    """Seconds from the backlog queued (the restarted node's reconcile) to the last step finished, and the median
    seconds of each step, once all ``n`` versions are through."""
    def done() -> bool:
        with engine.connect() as c:
            failed = c.execute(text("SELECT stage, error FROM jobs WHERE state = 'failed'")).all()
        if failed:
            raise RuntimeError(f"pipeline steps failed: {failed}")
        return count(engine, "SELECT count(*) FROM jobs WHERE stage = 'dispatch' AND state = 'done'") >= n

    wait_for(f"{n} studies through the pipeline", done, timeout, procs, every=0.25)
    with engine.connect() as c:
        rows = c.execute(text("SELECT version_id, stage, sent_at, started_at, finished_at, seconds, holder "
                              "FROM jobs ORDER BY version_id, id")).all()
    first = min(float(r.sent_at) for r in rows if r.stage == "convert")
    last = max(float(r.finished_at) for r in rows)
    with open(timeline, "w") as fh:  # for a closer look: when each step was queued, ran, and where
        for r in rows:
            fh.write(f"{r.version_id:3} {r.stage:10} queued {r.sent_at - first:7.2f} started "
                     f"{r.started_at - first:7.2f} finished {r.finished_at - first:7.2f} ({r.seconds:5.2f} s) "
                     f"{r.holder}\n")
    per_stage: dict[str, list[float]] = {}
    for r in rows:
        per_stage.setdefault(r.stage, []).append(float(r.seconds or 0.0))
    return last - first, {k: statistics.median(v) for k, v in per_stage.items()}


def send_all(studies: list[Path], port: int) -> None:
    """Every study to the node over one association (the node completes each version when it is released)."""
    files = [f for d in studies for f in sorted(d.rglob("*.dcm"))]
    results = send(files, Destination(NODE_AET, "127.0.0.1", port), calling_ae="BENCHSCU", timeout_s=120)
    bad = [r for r in results if not r.ok]
    if bad or len(results) != len(files):
        raise RuntimeError(f"sending the studies to the node: {len(bad)} instance(s) refused, e.g. {bad[:1]}")


def run_mode(mode: str, *, workers: int, torch_threads: int | None, studies: list[Path], base: dict[str, Any],
             work: Path, timeout: float) -> Result:
    """One fresh node (and ``workers`` worker processes; 0 = embedded); all studies through it.

    Distributed, two phases, so that the clock sees the workers drain a
    backlog and nothing else: (1) the node alone receives every study and
    completes every version (the messages it queues are then discarded: Redis
    flushed); (2) the workers start and warm up, then the node starts again and
    its start-up reconcile queues every version's first step at once, as after
    any restart. The clock runs from that reconcile to the last step finished.

    Embedded: one process is node and worker, so it is started and warmed
    first, then receives every study over one association; the versions
    complete when it is released. The clock runs from the first version's
    first step queued to the last step finished, and so includes the node's
    own assembly of the later versions, as an embedded node always does.
    """
    mode_dir = work / mode.replace(" ", "-").replace(",", "")
    mode_dir.mkdir(parents=True)
    settings = {**base, "port": free_port(), "data_dir": str(mode_dir / "data")}
    if torch_threads is not None:
        settings["torch_threads"] = torch_threads
    procs: list[Proc] = []
    with (fresh_pg_database() if workers else _nothing()) as pg_url, \
            (free_redis_db() if workers else _nothing()) as redis_url:
        if workers:
            settings.update(database_url=pg_url, broker_url=redis_url, serve_worker="none")
        index_url = settings.get("database_url") or f"sqlite:///{mode_dir / 'data' / 'index.sqlite3'}"
        env = node_env(settings)
        engine = None
        try:
            if workers:
                # (1) receive and complete every study, no worker running
                serve = spawn("serve-receive", [sys.executable, "-m", "dicomnode", "serve"], env, mode_dir)
                procs.append(serve)
                wait_for("the node listening", lambda: "listening as" in serve.text(), 300, procs)
                send_all(studies, settings["port"])
                engine = create_engine(index_url)
                wait_for("every version complete",
                         lambda: count(engine, "SELECT count(*) FROM jobs") >= len(studies), 300, procs)
                serve.stop()
                procs.remove(serve)
                redis.Redis.from_url(redis_url).flushdb()
                # (2) warm workers, then the node again: its reconcile queues the backlog
                runners = [spawn(f"worker-{k}", [sys.executable, "-m", "dicomnode", "worker", "--queues", "cpu,gpu"],
                                 env, mode_dir) for k in range(workers)]
                procs += runners
            else:
                runners = [spawn("serve", [sys.executable, "-m", "dicomnode", "serve"], env, mode_dir)]
                procs += runners
            wait_for("every worker warmed", lambda: all("warmed in" in p.text() for p in runners), 600, procs)
            if any("no valid checkpoint" in p.text() for p in runners):
                raise RuntimeError(f"the workers found no valid checkpoint in {settings['checkpoints_dir']}")
            if workers:
                cpu0 = sum(tree_cpu(p.popen.pid) for p in runners)
                procs.append(spawn("serve", [sys.executable, "-m", "dicomnode", "serve"], env, mode_dir))
            else:
                send_all(studies, settings["port"])
                cpu0 = tree_cpu(runners[0].popen.pid)  # receiving excluded; assembling and the steps counted
                engine = create_engine(index_url)
            seconds, steps = measure(engine, len(studies), timeout, procs, mode_dir / "timeline.txt")
            cpu = sum(tree_cpu(p.popen.pid) for p in runners) - cpu0
            threads = sorted({line.rsplit("torch: ", 1)[1].split(" ")[0] for p in runners
                              for line in p.text().splitlines() if "torch: " in line and "thread(s)" in line})
        finally:
            for p in reversed(procs):
                p.stop()
            if engine is not None:
                engine.dispose()
    return Result(mode, len(studies), seconds, ",".join(threads) or "?", steps, cpu / len(studies))


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def ensure_checkpoints(where: Path) -> Path:
    """The tiny test checkpoints, built under ``where`` once and reused (tests/checkpoints.py prints the folder)."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "checkpoints.py"), str(where)], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    folder = Path(out.splitlines()[0].rsplit(" (", 1)[0])
    if not any(folder.glob("*.pt")):
        raise RuntimeError(f"no checkpoint in {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=8, help="studies per mode (at least 6)")
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 64, 32], help="phantom voxels per sequence")
    ap.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench-checkpoints",
                    help="a folder of checkpoints (*.pt), or where to build the tiny test set")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of 1 worker / 2 workers, alternating (medians; other load on the host drifts)")
    ap.add_argument("--oversubscribed", action="store_true", help="also two workers with torch_threads on auto")
    ap.add_argument("--one-thread-baseline", action="store_true",
                    help="also one worker with torch_threads = 1 in each round: the process scaling alone")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per mode, for all studies")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--nice", type=int, default=0,
                    help="niceness of the node and worker processes: e.g. -10 (root) to approximate an idle host "
                         "on a shared one (PostgreSQL and Redis keep theirs)")
    args = ap.parse_args(argv)
    global NICE
    NICE = args.nice
    if args.studies < 6:
        ap.error("--studies must be at least 6")
    for tool in (STORESCP,):
        if not Path(tool).exists():
            print(f"{tool} not found (Debian package dcmtk)", file=sys.stderr)
            return 2
    ckpts = args.checkpoints if any(args.checkpoints.glob("*.pt")) else ensure_checkpoints(args.checkpoints)
    print(f"checkpoints: {', '.join(sorted(p.name for p in ckpts.glob('*.pt')))} in {ckpts}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="dicomnode-throughput-"))
    sink_port = free_port()
    (work / "sink").mkdir()
    # --fork: one process per association, as a PACS takes several senders at once (the workers' dispatch
    # steps and the node's outbox may all send at the same time)
    sink = subprocess.Popen([STORESCP, "--fork", "-aet", SINK_AET, "-od", str(work / "sink"), str(sink_port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    cores = usable_cores()
    base: dict[str, Any] = {
        "ae_title": NODE_AET, "host": "127.0.0.1", "min_free_disk_mb": 10, "log_level": "INFO",
        "checkpoints_dir": str(ckpts), "quiet_period_s": 30, "release_quiet_s": 0.5, "assembly_poll_s": 0.2,
        "reconcile_interval_s": 5, "dispatch_poll_s": 0.5,
        "destinations": [{"ae_title": SINK_AET, "host": "127.0.0.1", "port": sink_port}], **LOOSE_GATE,
    }
    results: list[Result] = []
    try:
        print(f"writing {args.studies} synthetic studies of {'x'.join(map(str, args.shape))} voxels per sequence ...",
              flush=True)
        studies = make_studies(work / "studies", args.studies, tuple(args.shape))  # type: ignore[arg-type]
        plan: list[tuple[str, int, int | None]] = []
        for _ in range(args.rounds):
            plan += [("1 worker", 1, None), ("2 workers", 2, max(1, cores // 2))]
            if args.one_thread_baseline:
                plan.append(("1 worker, 1 thread", 1, 1))
        if args.oversubscribed:
            plan.append(("2 workers, auto threads", 2, None))
        if not args.skip_embedded:
            plan.append(("embedded", 0, None))
        for k, (mode, workers, threads) in enumerate(plan):
            print(f"{mode}: running ...", flush=True)
            r = run_mode(mode, workers=workers, torch_threads=threads, studies=studies, base=base,
                         work=work / f"{k:02d}", timeout=args.timeout)
            results.append(r)
            steps = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.steps.items(), key=lambda kv: -kv[1]))
            print(f"{mode}: {r.studies} studies in {r.seconds:.1f} s = {r.per_min:.1f} studies/min "
                  f"(torch threads per process: {r.torch_threads}; {r.cpu_per_study:.2f} CPU s per study in the "
                  f"workers; median s per step: {steps})", flush=True)
    finally:
        sink.terminate()
        sink.wait()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print()
    print(f"host: {cores} usable cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(other load on the host lowers every figure and the ratio); node and workers at niceness {args.nice:+d}")
    by: dict[str, list[Result]] = {}
    for r in results:
        by.setdefault(r.mode, []).append(r)
    med: dict[str, float] = {}
    for mode, rs in by.items():
        med[mode] = statistics.median(r.per_min for r in rs)
        print(f"{mode:26} {med[mode]:6.1f} studies/min (median of {len(rs)}: "
              f"{', '.join(f'{r.per_min:.1f}' for r in rs)}; torch threads {rs[0].torch_threads}; "
              f"{statistics.median(r.cpu_per_study for r in rs):.2f} CPU s per study in the workers)")
    if "1 worker" in med and "2 workers" in med:
        print(f"ratio 2 workers / 1 worker: {med['2 workers'] / med['1 worker']:.2f}x (target >= {TARGET_RATIO})")
    if "1 worker, 1 thread" in med and "2 workers" in med:
        print(f"ratio 2 workers / 1 worker with the same torch threads (1): "
              f"{med['2 workers'] / med['1 worker, 1 thread']:.2f}x")
    if "2 workers, auto threads" in med and "1 worker" in med:
        print(f"ratio 2 workers on auto threads / 1 worker: {med['2 workers, auto threads'] / med['1 worker']:.2f}x")
    if "embedded" in med and "1 worker" in med:
        print(f"ratio embedded / 1 worker: {med['embedded'] / med['1 worker']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
