"""Conversion speed: the node's converter path with dicom2nifti vs with dcm2niix, on a BraTS-sized series.

    python benchmarks/convert.py [--rounds 5] [--shape 240 240 155] [--spacing 1 1 1]
                                 [--vendor siemens] [--enhanced] [--gz] [--keep DIR]

Writes one synthetic study (``dicomnode.synth.make_phantom`` + ``write_study``;
the T2 series: axial, one file per slice for classic, one multi-frame file for
``--enhanced``), then alternates, ``--rounds`` times each:

- ``convert_series(..., converters=("dicom2nifti",))``: what the node runs
  first (pydicom read of every file, source-image geometry, dicom2nifti with
  reorientation, atomic rename);
- ``convert_series(..., converters=("dcm2niix",))``: the node's fallback
  (same header pass, files linked into a private folder, the dcm2niix binary);
- the bare ``dcm2niix`` command on the series folder (the reference in NOTES.md).

Prints the median seconds of each and the ratios. The machine is shared:
alternating the three in one run keeps load changes from favouring one.
"""
from __future__ import annotations

import argparse
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

from dicomnode.stages.convert import DCM2NIIX, DICOM2NIFTI, convert_series  # noqa: E402
from dicomnode.synth import make_phantom, write_study  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    ap.add_argument("--vendor", default="siemens", choices=["siemens", "ge", "philips"])
    ap.add_argument("--enhanced", action="store_true")
    ap.add_argument("--gz", action="store_true", help="write .nii.gz (default .nii: the node's work files)")
    ap.add_argument("--keep", type=Path, help="write the study and outputs here instead of a temporary folder")
    args = ap.parse_args(argv)
    exe = shutil.which("dcm2niix")
    if exe is None:
        print("dcm2niix is not installed", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        vols, aff = make_phantom(shape=tuple(args.shape), spacing=tuple(args.spacing), seed=0)
        study = write_study({"T2": vols["T2"]}, aff, work / "study", vendor=args.vendor, enhanced=args.enhanced,
                            seed=0, roles=["T2"])
        files, uid = study.files["T2"], study.series["T2"]
        print(f"series: {args.vendor} {'enhanced' if args.enhanced else 'classic'} T2, "
              f"{'x'.join(map(str, args.shape))} at {'x'.join(f'{s:g}' for s in args.spacing)} mm, "
              f"{len(files)} file(s), written in {time.perf_counter() - t0:.1f} s")
        suffix = ".nii.gz" if args.gz else ".nii"
        times: dict[str, list[float]] = {DICOM2NIFTI: [], DCM2NIIX: [], "dcm2niix CLI": []}
        for r in range(args.rounds):
            for name in (DICOM2NIFTI, DCM2NIIX):
                t = time.perf_counter()
                res = convert_series(files, work / f"{name}-{r}{suffix}", role="T2", series_instance_uid=uid,
                                     converters=(name,))
                times[name].append(time.perf_counter() - t)
                if not res.ok:
                    print(f"{name} failed: {res.error}", file=sys.stderr)
                    return 1
            out = work / f"cli-{r}"
            out.mkdir()
            t = time.perf_counter()
            subprocess.run([exe, "-z", "y" if args.gz else "n", "-b", "n", "-f", "v", "-o", str(out),
                            str(files[0].parent)], check=True, capture_output=True)
            times["dcm2niix CLI"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{'converter path':<28}{'median s':>10}{'min s':>10}   ({args.rounds} rounds, alternating)")
        labels = {DICOM2NIFTI: "node, dicom2nifti", DCM2NIIX: "node, dcm2niix (fallback)",
                  "dcm2niix CLI": "dcm2niix command alone"}
        for k, label in labels.items():
            print(f"{label:<28}{med[k]:>10.3f}{min(times[k]):>10.3f}")
        print(f"ratio dicom2nifti / dcm2niix (node paths): {med[DICOM2NIFTI] / med[DCM2NIIX]:.1f}x")
        print(f"ratio dicom2nifti / dcm2niix command alone: {med[DICOM2NIFTI] / med['dcm2niix CLI']:.1f}x")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
