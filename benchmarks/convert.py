"""Conversion speed: the node's convert stage against bare dcm2niix on the same files, in the same run.

    python benchmarks/convert.py [--rounds 5] [--shape 240 240 155] [--spacing 1 1 1]
                                 [--vendor siemens] [--enhanced] [--gz] [--workers 1 2] [--keep DIR]

Writes one synthetic 4-series study (``dicomnode.synth.make_phantom`` +
``write_study``: T1, T1CE, T2, FLAIR, one folder per series; classic MR one
file per slice, or one Enhanced MR file per series with ``--enhanced``), then,
``--rounds`` times:

- per series: ``convert_series`` as the node runs it (one pydicom read of every
  file, source-image geometry, dicom2nifti in memory, the NIfTI written once)
  and the bare ``dcm2niix`` command on that series' folder, in alternating
  order; wall seconds and CPU seconds (this process for the node, the child
  for dcm2niix);
- the whole version: ``convert_version`` into a fresh folder for each
  ``--workers`` value (1 = one series after the other; 0 = the node's default,
  the idle cores), and ``dcm2niix`` on the 4 folders one after the other.

Prints medians and the ratios node / dcm2niix. The machine is shared: the CPU
ratio is the steadier figure under load, the wall ratio is what a study waits.
``--keep DIR`` keeps the study (and reuses it on the next run with the same
arguments: writing 4 x 155 slices takes a minute).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicomnode.stages.convert import (
    DICOM2NIFTI,
    convert_series,
    convert_version,
    default_workers,
)
from dicomnode.synth import make_phantom, write_study

ROLES: tuple[str, ...] = ("T1", "T1CE", "T2", "FLAIR")


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _dcm2niix(exe: str, folder: Path, out: Path, gz: bool) -> tuple[float, float]:
    """(wall s, CPU s) of the bare command on one series folder."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    c0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run([exe, "-z", "y" if gz else "n", "-b", "n", "-f", "v", "-o", str(out), str(folder)],
                   check=True, capture_output=True)
    return time.perf_counter() - t0, _children_cpu() - c0


def _study(work: Path, args: argparse.Namespace) -> dict[str, tuple[str, list[Path]]]:
    """role -> (SeriesInstanceUID, files): written now, or read back from an earlier run with the same arguments."""
    key = {"shape": args.shape, "spacing": args.spacing, "vendor": args.vendor, "enhanced": args.enhanced}
    record = work / "study.json"
    if record.exists():
        kept = json.loads(record.read_text())
        if kept["key"] == key and all(Path(f).exists() for _, files in kept["series"].values() for f in files):
            print("series: reusing the study in", work / "study")
            return {r: (uid, [Path(f) for f in files]) for r, (uid, files) in kept["series"].items()}
    shutil.rmtree(work / "study", ignore_errors=True)
    t0 = time.perf_counter()
    vols, aff = make_phantom(shape=tuple(args.shape), spacing=tuple(args.spacing), seed=0)
    study = write_study({r: vols[r] for r in ROLES}, aff, work / "study", vendor=args.vendor,
                        enhanced=args.enhanced, seed=0, roles=list(ROLES))
    series = {r: (study.series[r], study.files[r]) for r in ROLES}
    record.write_text(json.dumps({"key": key, "series": {r: (u, [str(f) for f in fs]) for r, (u, fs) in series.items()}}))
    print(f"series: written in {time.perf_counter() - t0:.1f} s")
    return series


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    ap.add_argument("--vendor", default="siemens", choices=["siemens", "ge", "philips"])
    ap.add_argument("--enhanced", action="store_true")
    ap.add_argument("--gz", action="store_true", help="write .nii.gz (default .nii: the node's work files)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="convert_version's workers to time (0 = the node's default: the idle cores)")
    ap.add_argument("--keep", type=Path, help="keep the study and outputs here (and reuse the study next time)")
    args = ap.parse_args(argv)
    exe = shutil.which("dcm2niix")
    if exe is None:
        print("dcm2niix is not installed", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if args.gz else ".nii"
    try:
        series = _study(work, args)
        folders = {r: files[0].parent for r, (_, files) in series.items()}
        print(f"study: {args.vendor} {'enhanced' if args.enhanced else 'classic'}, "
              f"{'x'.join(map(str, args.shape))} at {'x'.join(f'{s:g}' for s in args.spacing)} mm, "
              + ", ".join(f"{r} {len(f)} file(s)" for r, (_, f) in series.items())
              + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        node: dict[str, list[tuple[float, float]]] = {r: [] for r in ROLES}
        bare: dict[str, list[tuple[float, float]]] = {r: [] for r in ROLES}
        version: dict[str, list[float]] = {f"workers={w}": [] for w in args.workers}
        version["dcm2niix x4"] = []
        for rnd in range(args.rounds):
            for role, (uid, files) in series.items():
                for which in ((0, 1) if rnd % 2 == 0 else (1, 0)):
                    if which == 0:
                        c0, t0 = time.process_time(), time.perf_counter()
                        res = convert_series(files, work / "out" / f"{role}-{rnd}{suffix}", role=role,
                                             series_instance_uid=uid)
                        node[role].append((time.perf_counter() - t0, time.process_time() - c0))
                        if not res.ok or res.converter != DICOM2NIFTI:
                            print(f"{role}: {res.converter or 'failed'}: {res.error or res.attempts}", file=sys.stderr)
                            return 1
                    else:
                        bare[role].append(_dcm2niix(exe, folders[role], work / "cli" / role, args.gz))
            for w in args.workers:
                out = work / "version" / f"w{w}-{rnd}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                done = convert_version(series, out, workers=w or None)
                version[f"workers={w}"].append(time.perf_counter() - t0)
                if not all(c.ok for c in done.values()):
                    print(f"convert_version(workers={w}) failed: {[c.error for c in done.values()]}", file=sys.stderr)
                    return 1
            t0 = time.perf_counter()
            for role in ROLES:
                _dcm2niix(exe, folders[role], work / "cli4" / role, args.gz)
            version["dcm2niix x4"].append(time.perf_counter() - t0)
            shutil.rmtree(work / "out", ignore_errors=True)
            shutil.rmtree(work / "version", ignore_errors=True)

        def med(xs: list[float]) -> float:
            return statistics.median(xs)

        print(f"\nper series, medians of {args.rounds} rounds (node = convert_series, dicom2nifti; "
              f"dcm2niix = the bare command on the series folder)")
        print(f"{'series':<7}{'files':>6}{'node s':>9}{'dcm2niix s':>12}{'ratio':>7}"
              f"{'node CPU s':>12}{'dcm2niix CPU s':>16}{'CPU ratio':>11}")
        for role in ROLES:
            nw, nc = med([w for w, _ in node[role]]), med([c for _, c in node[role]])
            bw, bc = med([w for w, _ in bare[role]]), med([c for _, c in bare[role]])
            print(f"{role:<7}{len(series[role][1]):>6}{nw:>9.3f}{bw:>12.3f}{nw / bw:>6.1f}x"
                  f"{nc:>12.3f}{bc:>16.3f}{nc / max(bc, 1e-6):>10.1f}x")
        ref = med(version["dcm2niix x4"])
        print(f"\nwhole version (4 series), medians of {args.rounds} rounds; the node's default workers now: "
              f"{default_workers()} (load average {os.getloadavg()[0]:.1f})")
        for name, xs in version.items():
            print(f"{'convert_version ' + name if name != 'dcm2niix x4' else 'dcm2niix, 4 folders in turn':<34}"
                  f"{med(xs):>8.3f} s{med(xs) / ref:>7.1f}x")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
