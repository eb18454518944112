"""Coverage-guided fuzzing of the listener's receive path with atheris (libFuzzer for Python).

    python benchmarks/fuzz_receive.py [--seconds N] [--corpus DIR] [--crashes DIR] [--known SIG ...] [--json FILE]
    python benchmarks/fuzz_receive.py --replay FILE [FILE ...]
    python benchmarks/fuzz_receive.py --minimize FILE

One input is one received C-STORE data set (the layout and the invariants
are in tests/fuzz_target.py): written to a temporary spool file behind the
file meta the node's pynetdicom shim writes, judged by ``inspect_received``,
committed to the spool and indexed when accepted, read back with pydicom.
A crash is a broken invariant: an exception other than ``Refused``, a
refusal status outside 0xA7xx/0xA9xx/0xCxxx, an accepted instance pydicom
cannot read back (or whose last element was cut short), a file written
outside the harness's temporary directory, a temporary file left behind;
and, from libFuzzer, an input that runs for more than ``--timeout`` seconds
or takes more than ``--rss-mb`` of memory.

Why two processes: ``atheris.Fuzz()`` never returns (libFuzzer exits the
process when the time is up or at the first crash). This script therefore
builds the seed corpus, then runs the fuzzer in a child process
(``--child``) and reads back what it left: libFuzzer's final statistics and
the findings the target wrote. After a crash it starts the child again for
the time left, with that crash's signature added to the known ones, so one
run reports every distinct bug it meets instead of stopping at the first
(``--max-restarts`` bounds this). Known signatures (``--known``) are
counted but are not crashes: the CI test passes the signatures of the bugs
that its xfail regression inputs pin down, so a known, reported bug does
not hide new ones.

Coverage: the child imports dicomnode and pydicom inside
``atheris.instrument_imports()``, so libFuzzer's feedback covers the node's
checks and pydicom's parser (SQLAlchemy and the standard library are not
instrumented: their coverage would dilute the signal and slow every input).

Prints executions, executions/s, corpus size and the crashes found (each
with its signature and the path of its reproducer); exits 1 if a crash with
an unknown signature was found, 0 otherwise. The default run is an hour;
``--seconds 0`` runs until interrupted (Ctrl-C still prints the summary).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
# This directory has a models.py that would shadow the repository's models package (dicomnode.synth
# imports models.vocab): look up imports from the repository and the tests (fuzz_target, nodeutil) instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path[:0] = [str(TESTS), str(REPO)]

STATS_EVERY_S = 2.0


# -- child: the fuzzing process ----------------------------------------------------------------


def child(args: argparse.Namespace, libfuzzer_argv: list[str]) -> None:
    """Run atheris in this process; never returns (libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=["dicomnode", "pydicom", "fuzz_target"]):
        import fuzz_target as ft

    ft.quiet_logging()
    crashes = Path(args.crashes)
    known = set(args.known or ())
    known_file = crashes / "known.txt"
    if known_file.exists():
        known.update(s for s in known_file.read_text().splitlines() if s)
    harness = ft.ReceiveHarness(parent=args.workdir)  # never closed: libFuzzer exits; the parent removes workdir
    stats: dict[str, Any] = {"executions": 0, "outcomes": {}, "known_hits": {}, "started": time.time()}
    stats_file = Path(args.stats)
    last = [time.monotonic()]

    def dump() -> None:
        stats["elapsed_s"] = time.time() - stats["started"]
        tmp = stats_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, stats_file)

    def test_one_input(data: bytes) -> None:
        stats["executions"] += 1
        try:
            outcome = harness.run(data)
            key = f"0x{outcome.status:04X}"
        except ft.Finding as f:
            if f.signature not in known:
                name = ft.input_name(data)
                (crashes / f"finding-{name}.bin").write_bytes(data)
                (crashes / f"finding-{name}.txt").write_text(f.report())
                with open(crashes / "found.txt", "a") as fh:
                    fh.write(f"{f.signature}\t{name}\n")
                dump()
                raise
            key = "known"
            stats["known_hits"][f.signature] = stats["known_hits"].get(f.signature, 0) + 1
        stats["outcomes"][key] = stats["outcomes"].get(key, 0) + 1
        now = time.monotonic()
        if now - last[0] > STATS_EVERY_S:
            last[0] = now
            dump()

    atheris.Setup([sys.argv[0], *libfuzzer_argv], test_one_input)
    atheris.Fuzz()


# -- parent: corpus, restarts, summary ---------------------------------------------------------

_FINAL = re.compile(r"stat::(\w+):\s*(\d+)")
_CORP = re.compile(r"^#\d+\s.*?\bcov: (\d+) ft: (\d+) corp: (\d+)/", re.M)


def write_seeds(corpus: Path) -> int:
    """Add the generated seed corpus (idempotent: files are named by content hash)."""
    import fuzz_target as ft

    seeds = ft.seed_corpus()
    for data in seeds.values():
        path = corpus / ft.input_name(data)
        if not path.exists():
            path.write_bytes(data)
    return len(seeds)


def run_child(args: argparse.Namespace, seconds: int, corpus: Path, crashes: Path, stats: Path,
              log: Path) -> tuple[int, str]:
    """One libFuzzer session; returns (exit code, its output)."""
    libfuzzer = [
        f"-max_total_time={seconds}" if seconds else "-max_total_time=0",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        f"-max_len={args.max_len}",
        f"-artifact_prefix={crashes}{os.sep}",
        "-print_final_stats=1",
        str(corpus),
    ]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--crashes", str(crashes),
           "--stats", str(stats), "--workdir", str(args.workdir), *(a for s in (args.known or ()) for a in ("--known", s)), "--", *libfuzzer]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)  # libFuzzer prints its final stats on SIGINT
            rc = proc.wait()
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, _read_from(log, offset)


def _read_from(log: Path, offset: int) -> str:
    with open(log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def _artifact_finding(output: str, crashes: Path, before: set[str]) -> str | None:
    """A crash libFuzzer caught that the target did not record (timeout, out of memory, a signal)."""
    new = sorted(p.name for p in crashes.iterdir()
                 if p.name not in before and re.match(r"(crash|timeout|oom|leak)-", p.name))
    kind = "timeout" if "ALARM: working on the last Unit" in output else \
        "oom" if "out-of-memory" in output else "deadly-signal" if "deadly signal" in output else None
    if kind is None and not new:
        return None
    return f"{kind or 'libfuzzer-crash'}\t{new[0] if new else '?'}"


def parent(args: argparse.Namespace) -> int:
    """Seed the corpus, run fuzzing sessions until the time is up, print (and return the verdict of) the summary."""
    import shutil

    import fuzz_target as ft

    # Each session's harness (spool + index) lives here; libFuzzer exits without cleaning up, so this does.
    args.workdir = tempfile.mkdtemp(prefix="dicomnode-fuzz-run-", dir=ft.fast_tmp())
    try:
        return _parent(args)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _parent(args: argparse.Namespace) -> int:
    corpus = Path(args.corpus) if args.corpus else Path(tempfile.mkdtemp(prefix="dicomnode-fuzz-corpus-"))
    corpus.mkdir(parents=True, exist_ok=True)
    crashes = Path(args.crashes) if args.crashes else corpus.parent / f"{corpus.name}-crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    seeds = write_seeds(corpus)
    print(f"corpus {corpus} ({seeds} seeds, {len(list(corpus.iterdir()))} inputs), crashes {crashes}", flush=True)
    known_file = crashes / "known.txt"
    known = set(args.known or ())
    if known_file.exists():
        known.update(s for s in known_file.read_text().splitlines() if s)
    known_at_start = set(known)
    log = crashes / "fuzz.log"  # libFuzzer's output, every session of this run
    log.write_text("")
    offset = 0
    totals: dict[str, Any] = {"executions": 0, "fuzz_seconds": 0.0, "outcomes": {}, "known_hits": {}, "sessions": 0}
    findings: list[dict[str, str]] = []
    start = time.time()
    deadline = start + args.seconds if args.seconds else None
    interrupted = False
    while True:
        left = int(deadline - time.time()) if deadline else 0
        if deadline and left < 3:
            break
        stats_file = crashes / f"stats-{totals['sessions']}.json"
        found_file = crashes / "found.txt"
        found_before = found_file.read_text().splitlines() if found_file.exists() else []
        artifacts_before = {p.name for p in crashes.iterdir()}
        known_file.write_text("\n".join(sorted(known)) + "\n")
        offset = log.stat().st_size
        try:
            rc, output = run_child(args, left, corpus, crashes, stats_file, log)
        except KeyboardInterrupt:
            rc, output, interrupted = 0, _read_from(log, offset), True
        totals["sessions"] += 1
        s = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        # The child's own counts are sampled every STATS_EVERY_S; libFuzzer's final line (printed at the
        # end, on a crash and on Ctrl-C) is exact, and wins when the child stopped between two samples.
        final = {k: int(v) for k, v in _FINAL.findall(output)}
        execs, seconds = s.get("executions", 0), s.get("elapsed_s", 0.0)
        if final.get("number_of_executed_units", 0) > execs and final.get("average_exec_per_sec"):
            execs = final["number_of_executed_units"]
            seconds = execs / final["average_exec_per_sec"]
        totals["executions"] += execs
        totals["fuzz_seconds"] += seconds
        for k in ("outcomes", "known_hits"):
            for key, n in s.get(k, {}).items():
                totals[k][key] = totals[k].get(key, 0) + n
        if interrupted or rc == 0:
            break
        found_now = found_file.read_text().splitlines() if found_file.exists() else []
        new_lines = found_now[len(found_before):]
        if not new_lines:
            line = _artifact_finding(output, crashes, artifacts_before)
            if line is None:  # the child failed before fuzzing (import error, bad flag): not a finding
                print(output[-4000:], file=sys.stderr)
                return 2
            new_lines = [line]
        for line in new_lines:
            sig, name = line.split("\t")
            known.add(sig)
            reproducer = crashes / f"finding-{name}.bin"
            findings.append({"signature": sig, "input": str(reproducer if reproducer.exists() else crashes / name),
                             "report": str(crashes / f"finding-{name}.txt")})
            print(f"CRASH {sig}: {reproducer}", flush=True)
        if len(findings) >= args.max_restarts:
            print(f"stopping after {len(findings)} crashes (--max-restarts)", flush=True)
            break
    corpus_files = [p for p in corpus.iterdir() if p.is_file()]
    last_output = _read_from(log, offset)
    final = {k: int(v) for k, v in _FINAL.findall(last_output)}
    progress = _CORP.findall(last_output)
    if progress:  # libFuzzer's own view: its in-memory corpus (reduced) and coverage counters
        final.update(zip(("cov", "features", "corpus_units"), map(int, progress[-1])))
    elapsed = time.time() - start
    summary = {
        "executions": totals["executions"],
        "exec_per_s": round(totals["executions"] / totals["fuzz_seconds"], 1) if totals["fuzz_seconds"] else 0.0,
        "wall_s": round(elapsed, 1),
        "sessions": totals["sessions"],
        "corpus_inputs": len(corpus_files),
        "corpus_bytes": sum(p.stat().st_size for p in corpus_files),
        "seeds": seeds,
        "outcomes": dict(sorted(totals["outcomes"].items())),
        "known_hits": totals["known_hits"],
        "crashes": findings,
        "new_crashes": [f for f in findings if f["signature"] not in known_at_start],
        "libfuzzer_last_session": final,
        "corpus": str(corpus),
        "crashes_dir": str(crashes),
    }
    print(f"executions {summary['executions']} in {totals['fuzz_seconds']:.0f} s of fuzzing "
          f"({summary['exec_per_s']} exec/s, {summary['sessions']} session(s)); "
          f"corpus {summary['corpus_inputs']} inputs, {summary['corpus_bytes']} bytes"
          + (f" (libFuzzer keeps {final['corpus_units']} units, cov {final['cov']})" if "cov" in final else ""))
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items()))
    for sig, n in summary["known_hits"].items():
        print(f"known finding {sig}: hit {n} times")
    print(f"crashes found: {len(findings)}" + "".join(f"\n  {f['signature']}  {f['input']}" for f in findings))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["new_crashes"] else 0


def replay(paths: list[str]) -> int:
    """Run saved inputs through the target (no fuzzing, no instrumentation) and print each outcome."""
    import fuzz_target as ft

    ft.quiet_logging()
    bad = 0
    with ft.ReceiveHarness() as harness:
        for p in paths:
            data = Path(p).read_bytes()
            try:
                outcome = harness.run(data)
                print(f"{p}: 0x{outcome.status:04X} {outcome.detail}")
            except ft.Finding as f:
                bad += 1
                print(f"{p}: FINDING\n{f.report()}")
    return 1 if bad else 0


def minimize(path: str, budget_s: float) -> int:
    """Shrink a crash input to the smallest that fails the same way; print it as a Python bytes literal."""
    import fuzz_target as ft

    ft.quiet_logging()
    data = Path(path).read_bytes()
    with ft.ReceiveHarness() as harness:
        small = ft.minimize(harness, data, budget_s)
        signature = ft.signature_of(harness, small)
    out = Path(path).with_suffix(".min")
    out.write_bytes(small)
    print(f"{signature}: {len(data)} -> {len(small)} bytes, written to {out}\n{small!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    libfuzzer_argv: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, libfuzzer_argv = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=3600, help="total fuzzing time; 0: until interrupted")
    ap.add_argument("--corpus", help="corpus directory (kept; default: a new temporary one)")
    ap.add_argument("--crashes", help="where findings go (default: <corpus>-crashes next to the corpus)")
    ap.add_argument("--known", action="append", help="a finding signature not to count as a crash (repeatable)")
    ap.add_argument("--json", help="also write the summary as JSON here")
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a crash")
    ap.add_argument("--rss-mb", type=int, default=3072, help="memory limit of the fuzzing process")
    ap.add_argument("--max-len", type=int, default=8192, help="largest input libFuzzer makes")
    ap.add_argument("--max-restarts", type=int, default=20, help="stop after this many distinct crashes")
    ap.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs through the target and exit")
    ap.add_argument("--minimize", metavar="FILE", help="shrink a crash input (same signature) and exit")
    ap.add_argument("--minimize-seconds", type=float, default=120.0, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    if args.minimize:
        return minimize(args.minimize, args.minimize_seconds)
    if args.child:
        child(args, libfuzzer_argv)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
