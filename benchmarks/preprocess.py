"""Seconds per clinical preprocessing step and per study, with the conversion peer (dcm2niix) in the same run.

One command::

    .venv/bin/python benchmarks/preprocess.py [--rounds 3] [--device cpu|cuda]

The study: a synthetic whole head (training.heads) around a cohort case at 1 mm,
written as a native study (a 3D 1 mm T1 and 2D 5 mm T1CE, T2, FLAIR), converted
by dcm2niix (timed: the peer), then prepared with the 4-role clinical spec at
1 mm (bias field, co-registration, deepbet, MNI152 registration, crop,
normalise). Prints seconds per step (median over rounds; the first round
includes loading deepbet and the template, reported apart) and the ratio of
the whole chain to dcm2niix's conversion of the same four series.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _study(tmp: Path) -> dict[str, Path]:
    """A native whole-head study written as DICOM: a 3D 1 mm T1, 2D 5 mm T1CE, T2 and FLAIR (role -> folder)."""
    from dicomnode.synth.writer import write_study
    from training import heads

    three_d, two_d = heads.geometry_preset("siemens", "3d"), heads.geometry_preset("siemens", "2d")
    geometries = {"T1": three_d["T1"], "T1CE": two_d["T1CE"], "T2": two_d["T2"], "FLAIR": two_d["FLAIR"]}
    study = heads.native_study(heads.synthetic_case(seed=7), geometries, vendor="siemens", seed=7)
    written = write_study(**study.writer_args(), out_dir=tmp / "dicom", vendor="siemens", seed=7)
    return {r: tmp / "dicom" / r for r in written.series}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    import torch

    from models import clinical
    from models.preprocess import _TRANSFORMS, _Transform, apply_spec, clinical_volume_spec

    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings: dict[str, list[float]] = {}
    for name in ("bias_field", "coregister", "brain_extract", "atlas_register"):
        fn = getattr(clinical, name)

        def timed(case, p, fn=fn, name=name):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            out = fn(case, p)
            timings.setdefault(name, []).append(time.perf_counter() - t)
            return out

        _TRANSFORMS[name] = _Transform(name, _TRANSFORMS[name].validate, timed, True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        series = _study(tmp)
        peer: list[float] = []
        niftis: dict[str, Path] = {}
        for role, folder in series.items():
            out = tmp / "nii" / role
            out.mkdir(parents=True)
            t = time.perf_counter()
            subprocess.run(["dcm2niix", "-z", "n", "-o", str(out), "-f", role, str(folder)], check=True,
                           capture_output=True)
            peer.append(time.perf_counter() - t)
            niftis[role] = next(out.glob("*.nii"))
        spec = clinical_volume_spec(["T1", "T1CE", "T2", "FLAIR"], [160, 192, 160], spacing=(1, 1, 1))
        totals = []
        for r in range(args.rounds + 1):
            t = time.perf_counter()
            case = apply_spec(spec, niftis)
            totals.append(time.perf_counter() - t)
        m = case.meta["measurements"]
    conv = sum(peer)
    print(f"study: 3D 1 mm T1 + 2D 5 mm T1CE/T2/FLAIR; {args.rounds} rounds after a warm-up round "
          f"(warm-up {totals[0]:.1f} s incl. loading deepbet and the template)")
    for name, vals in timings.items():
        print(f"  {name:15s} median {statistics.median(vals[1:] or vals):6.2f} s  (per study, all roles)")
    whole = statistics.median(totals[1:])
    print(f"  whole chain     median {whole:6.2f} s per study; dcm2niix conversion of the same 4 series "
          f"{conv:.2f} s; ratio {whole / conv:.0f}x")
    print(f"  brain {m['brain_volume_ml']:.0f} ml, atlas Dice {m['atlas_dice']:.2f}, atlas MI {m['atlas_mi']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
