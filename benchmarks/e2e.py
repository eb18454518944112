"""End to end: time from "study complete" to "SR stored in the PACS", with the per-stage split.

    python benchmarks/e2e.py [--rounds 1] [--shape 240 240 155] [--checkpoints DIR] [--keep DIR]

A real Orthanc (Debian package) is the PACS; a real ``dicomnode serve`` process
(embedded mode: in-process Celery worker) is the node, with Orthanc as its
destination. Each round writes a synthetic 4-sequence study (T1, T1CE, T2,
FLAIR; ``--shape`` voxels at 1 mm, Siemens classic MR: one file per slice),
stores it in Orthanc, routes it to the node (REST ``/modalities/node/store``),
and polls Orthanc every 50 ms for the SR.

Figures printed per round and as medians:

- routing: Orthanc -> node transfer of the whole study (Orthanc's own C-STORE SCU);
- quiet period: the node's completion wait (a setting, 2 s here, not work);
- complete -> SR in PACS: from the version's completion time (index) to the SR seen in
  Orthanc, split into the steps' own seconds (convert, preprocess, infer, report, dispatch,
  from the index) and the rest (queueing, hand-offs, Orthanc's storage, polling);
- the peer for the conversion step: the bare ``dcm2niix`` on the same four series in the
  same run, and the ratio convert / dcm2niix.

Checkpoints: ``--checkpoints DIR`` (e.g. a site's or ``dicomnode demo``'s); by default the
tiny real checkpoints of the test suite (tests/checkpoints.py, specs of 32 voxels per side at
6 mm), so infer here is a lower bound: see benchmarks/models.py for the networks at the papers'
input sizes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from dicomnode.stages import STAGE_NAMES as STAGES  # noqa: E402  (the one stage list)
from dicomnode.synth import make_phantom, write_study  # noqa: E402
from nodeutil import NodeProcess, free_port  # noqa: E402
from pacs import Orthanc  # noqa: E402



def _epoch(iso: str) -> float:
    return dt.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def dcm2niix_seconds(study_dir: Path, out: Path) -> float:
    total = 0.0
    for role_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
        o = out / role_dir.name
        o.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-o", str(o), str(role_dir)], check=True,
                       capture_output=True)
        total += time.perf_counter() - t0
    return total


def one_round(k: int, work: Path, shape: tuple[int, int, int], ckpts: Path) -> dict[str, Any]:
    study_dir = work / f"study{k}"
    volumes, affine = make_phantom(shape=shape, spacing=(1.0, 1.0, 1.0), seed=100 + k, tumour=True, grade="HGG")
    files = write_study(volumes, affine, study_dir, vendor="siemens", seed=100 + k).all_files()
    port = free_port()
    orthanc = Orthanc(work / f"pacs{k}", port)
    node = NodeProcess(work / f"data{k}", port=port, quiet_period_s=2, allowed_peers=["ORTHANC@127.0.0.1"],
                       destinations=[orthanc.destination], checkpoints_dir=str(ckpts), dispatch_poll_s=0.2)
    try:
        node.start(timeout=120)
        ostudy = orthanc.upload(files)
        t_route = time.time()
        orthanc.request("POST", "/modalities/node/store", ostudy.encode())  # returns when the transfer is done
        routed = time.time() - t_route
        t_sr = None
        deadline = time.time() + 1800
        while time.time() < deadline:
            if orthanc.instances_by_modality(ostudy, "SR"):
                t_sr = time.time()
                break
            time.sleep(0.05)
        if t_sr is None:
            raise RuntimeError("no SR within 30 min")
        version = node.status()["studies"][0]["versions"][-1]
        completed = _epoch(version["completed_at"])
        steps = {s: version["pipeline"][s]["seconds"] for s in STAGES if s in version["pipeline"]}
        peer = dcm2niix_seconds(study_dir, work / f"dcm2niix{k}")
        return {"files": len(files), "routing_s": routed, "complete_to_sr_s": t_sr - completed, "steps": steps,
                "steps_sum_s": sum(steps.values()), "dcm2niix_s": peer,
                "models": [m["family"] for m in version["report"]["models"]]}
    finally:
        node.stop()
        orthanc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--checkpoints", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    if shutil.which("Orthanc") is None or shutil.which("dcm2niix") is None:
        print("needs Orthanc and dcm2niix (Debian packages orthanc, dcm2niix)", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpts = args.checkpoints
    if ckpts is None:
        from checkpoints import build_checkpoints

        ckpts = build_checkpoints(work / "checkpoints")
    rounds = []
    for k in range(args.rounds):
        r = one_round(k, work, tuple(args.shape), ckpts)
        rounds.append(r)
        steps = "  ".join(f"{s} {v:.2f}" for s, v in r["steps"].items())
        print(f"round {k}: {r['files']} files; routing {r['routing_s']:.2f} s; complete -> SR in PACS "
              f"{r['complete_to_sr_s']:.2f} s (steps {r['steps_sum_s']:.2f} s: {steps}; "
              f"rest {r['complete_to_sr_s'] - r['steps_sum_s']:.2f} s); models {','.join(r['models'])}; "
              f"dcm2niix on the 4 series {r['dcm2niix_s']:.2f} s -> convert/dcm2niix "
              f"{r['steps'].get('convert', 0) / r['dcm2niix_s']:.1f}x", flush=True)
    med = statistics.median
    print(f"median over {len(rounds)} round(s), {args.shape[0]}x{args.shape[1]}x{args.shape[2]} x 4 sequences:")
    print(f"  complete -> SR stored in Orthanc: {med(r['complete_to_sr_s'] for r in rounds):.2f} s")
    for s in STAGES:
        vals = [r["steps"].get(s) for r in rounds if r["steps"].get(s) is not None]
        if vals:
            print(f"    {s:10} {med(vals):.2f} s")
    print(f"    other      {med(r['complete_to_sr_s'] - r['steps_sum_s'] for r in rounds):.2f} s "
          f"(queueing, hand-offs, Orthanc storing, 50 ms polling)")
    print(f"  routing Orthanc -> node: {med(r['routing_s'] for r in rounds):.2f} s")
    conv = med(r["steps"].get("convert", 0) for r in rounds)
    peer = med(r["dcm2niix_s"] for r in rounds)
    print(f"  convert step {conv:.2f} s vs bare dcm2niix {peer:.2f} s: ratio {conv / peer:.1f}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
