"""Report step speed: the first study after a worker starts (after ``warm``) and the steady state.

    python benchmarks/report.py [--studies 10] [--shape 240 240 155] [--work DIR] [--baseline-tree DIR] [--profile]

Setup (this process, not timed): one synthetic 4-sequence study (``dicomnode.synth``:
T1, T1CE, T2, FLAIR, Siemens classic MR, all axial, ``--shape`` voxels at 1 mm, so
4 x 155 = 620 source instances, every one of them evidence in the SR), the prepared
cases the pipeline would leave (MMDLM's slice bag, the 3D CNN's volume, in the
``dicomnode.case/1`` format, written with numpy alone) and a ``VersionResult``: MMDLM
graded (grade, IDH, 1p/19q; three key slices), the 3D CNN graded (grade), the
cross-modality network declined by the gate.

Measured in ONE fresh interpreter, as a report worker lives:

- ``warm``: importing ``dicomnode.stages.report`` and calling its ``warm(ctx)`` in a
  background thread, joined (what the runtime does when a worker starts);
- first study: ``write_reports`` right after, with fsync, into a fresh folder;
- steady state: ``--studies`` more versions of the study: median and max wall seconds,
  CPU seconds (the machine may be shared: CPU time is the steadier figure), and the
  split SR build / summary build / writes (``timed_write_reports``).

The peer: ``--baseline-tree DIR`` runs the same measurement on another checkout of the
repository (e.g. the commit before this benchmark: ``git worktree add /tmp/old <commit>``)
in its own fresh interpreter, and prints new / baseline ratios. An older tree without
``warm`` or ``timed_write_reports`` is measured through what it has (its import is still
paid in the background, as the runtime imports every stage module it warms).

Target: 0.5 s per study, the first after warm included. ``--profile``: cProfile's top
functions of one more steady-state call.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# the tree under test: this one, or (in a baseline child) the checkout named by --baseline-tree
TREE = Path(os.environ.get("DICOMNODE_BENCH_TREE") or REPO)
if str(TREE) not in sys.path:
    sys.path.insert(0, str(TREE))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from dicomnode.handoff import (  # noqa: E402
    Decision,
    Declined,
    GateReason,
    InputSeries,
    KeySlice,
    ModelResult,
    SourceRef,
    TaskResult,
    VersionResult,
)
from dicomnode.synth import make_phantom, write_study  # noqa: E402

TARGET_S = 0.5
ROLES = ("T1", "T1CE", "T2", "FLAIR")
WHEN = dt.datetime(2026, 3, 4, 10, 11, 12)
CASE_FORMAT = "dicomnode.case/1"


# --------------------------------------------------------------------------- setup (not timed)


def _study(work: Path, shape: tuple[int, int, int]) -> dict[str, list[Path]]:
    """The source files per role; written once per --work folder (writing 620 files is slow on a busy disk)."""
    src = work / "src"
    files = {r: sorted((src / r).glob("*.dcm")) for r in ROLES}
    if all(len(f) == shape[2] for f in files.values()):
        return files
    vols, affine = make_phantom(shape=shape, spacing=(1.0, 1.0, 1.0), seed=1, grade="HGG")
    # every series axial (the vendor protocol's T1 is sagittal): 4 x 155 instances, as in BraTS-like studies
    study = write_study(vols, affine, src, vendor="siemens", seed=1, planes={r: "ax" for r in ROLES})
    return {r: list(study.files[r]) for r in ROLES}


def _inputs(files: dict[str, list[Path]]) -> list[InputSeries]:
    out = []
    for role in ROLES:
        refs, paths = [], []
        first = None
        for f in files[role]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            first = first or ds
            refs.append(SourceRef(str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
            paths.append(str(f))
        assert first is not None
        out.append(InputSeries(role, str(first.SeriesInstanceUID), int(first.SeriesNumber),
                               str(first.SeriesDescription), refs, paths[0], converter="dicom2nifti",
                               nifti=None, files=paths))
    return out


def _steps(shape: list[int]) -> dict[str, Any]:
    return {
        "spec": {"transforms": [{"name": "reorient"}, {"name": "resample"}, {"name": "bias_field"},
                                {"name": "brain_extract"}, {"name": "coregister"}, {"name": "atlas_register"},
                                {"name": "brain_mask", "method": "deepbet"}, {"name": "crop_or_pad"},
                                {"name": "normalize"}]},
        "steps": [
            {"name": "reorient", "to": "RAS"},
            {"name": "resample", "spacing": [1.0, 1.0, 1.0], "shape": shape},
            {"name": "bias_field", "roles": {"T1": {}, "T1CE": {}, "T2": {}, "FLAIR": {}}},
            {"name": "brain_extract", "method": "deepbet", "role": "T1", "volume_ml": 1422.0},
            {"name": "coregister", "reference": "T1",
             "roles": {"T1CE": {"registered": True}, "T2": {"registered": True}, "FLAIR": {"registered": False}}},
            {"name": "atlas_register", "template": "mni152_2009", "registered": True, "atlas_mi": 0.61,
             "atlas_dice": 0.93, "atlas_scale": 1.02},
            {"name": "brain_mask", "voxels": 1422000},
            {"name": "crop_or_pad", "box": [[8, 232], [8, 232], [0, 155]]},
            {"name": "normalize", "method": "zscore", "where": "brain"},
        ],
        "measurements": {"brain_volume_ml": 1422.0, "coregister_mi/T1CE": 0.58, "coregister_mi/T2": 0.55},
    }


def _save_case(path: Path, arrays: dict[str, np.ndarray], affine: np.ndarray, meta: dict[str, Any],
               **optional: np.ndarray) -> str:
    """A prepared case as ``models.casefile.save_case`` writes it (numpy only: no torch in the benchmark)."""
    header = {"format": CASE_FORMAT, "roles": list(arrays), "meta": meta}
    body = {f"array/{r}": a for r, a in arrays.items()}
    body.update(affine=affine, **optional)
    body["header.json"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **body)
    return str(path)


def _cases(work: Path, shape: tuple[int, int, int]) -> tuple[str, str, list[int]]:
    """MMDLM's slice bag (24 slices of 224 x 224 per role) and the 3D CNN's 128^3 volume case."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    grid = np.zeros(shape, dtype=bool)
    c = np.array(shape) // 2
    x, y, z = np.ogrid[:shape[0], :shape[1], :shape[2]]
    grid[((x - c[0]) / 80.0) ** 2 + ((y - c[1]) / 95.0) ** 2 + ((z - c[2]) / 60.0) ** 2 < 1] = True
    indices = np.linspace(c[2] - 40, c[2] + 40, 24).astype(np.int64)
    bag = {r: rng.normal(size=(24, 224, 224)).astype(np.float32) for r in ("T1CE", "T2", "FLAIR")}
    meta = _steps(list(shape)) | {"shape": list(shape), "slices": {"axis": 2, "count": 24, "real": 24}}
    slices = _save_case(work / "mmdlm.npz", bag, affine, meta, mask=grid, slice_indices=indices)
    vol = {r: rng.normal(size=(128, 128, 128)).astype(np.float32) for r in ROLES}
    m = np.zeros((128, 128, 128), dtype=bool)
    m[20:108, 16:112, 20:100] = True
    volume = _save_case(work / "fs3dcnn.npz", vol, affine, _steps([128, 128, 128]), mask=m, template_mask=m)
    return slices, volume, [int(i) for i in indices]


def _task(name: str, label: str, probs: dict[str, float]) -> TaskResult:
    return TaskResult(name, label, probs[list(probs)[1]], probs, True)


MEASURES = {"brain_volume_ml": 1422.0, "atlas_mi": 0.61, "atlas_dice": 0.93, "atlas_scale": 1.02,
            **{f"slice_thickness_mm/{r}": 1.0 for r in ROLES}, **{f"inplane_spacing_mm/{r}": 1.0 for r in ROLES},
            **{f"slices/{r}": 155.0 for r in ROLES}, **{f"intensity_cv/{r}": 0.3 for r in ROLES}}


def make_result(work: Path, shape: tuple[int, int, int]) -> VersionResult:
    """The realistic version: 620 evidence references, two graded models (MMDLM with key slices), one declined."""
    inputs = _inputs(_study(work, shape))
    slices, volume, indices = _cases(work, shape)
    by_role = {s.role: s for s in inputs}
    keys = [KeySlice(role, att, by_role[role].instances[idx], grid_index=idx)
            for role, att, idx in (("T2", 0.41, indices[9]), ("FLAIR", 0.22, indices[8]), ("T1CE", 0.12, indices[12]))]
    common = dict(checkpoint_created="2026-02-01T00:00:00Z", device="cuda", seconds=1.5,
                  training_data={"description": "BraTS2020", "protocol": "table 2", "row": "MMDLM",
                                 "train": {"n_cases": 295, "labels": {"grade": {"HGG": 234, "LGG": 61}}},
                                 "val": {"n_cases": 74, "labels": {"grade": {"HGG": 59, "LGG": 15}}}},
                  metrics={"test": {"grade": {"auc": 0.912, "n": 74, "sensitivity": 0.9, "specificity": 0.8}},
                           "val": {"grade": {"auc": 0.93, "n": 74}}},
                  measurements=dict(MEASURES))
    mmdlm = ModelResult(
        family="mmdlm", paper="seed 002 (MMDLM)", checkpoint_name="mmdlm-2026.ckpt", checkpoint_sha256="a1" * 32,
        input_roles=["T1CE", "T2", "FLAIR"], reason="mmdlm runs on T1CE+T2+FLAIR, all present.",
        tasks=[_task("grade", "HGG", {"LGG": 0.125, "HGG": 0.875}),
               _task("idh", "IDH-wildtype", {"IDH-wildtype": 0.7, "IDH-mutant": 0.3}),
               _task("1p19q", "1p/19q-intact", {"1p/19q-intact": 0.8, "1p/19q-codeleted": 0.2})],
        key_slices=keys, prepared_case=slices, feature_distance=3.2, feature_threshold=7.5, **common)
    fs3d = ModelResult(
        family="fs3dcnn", paper="seed 001 (3D CNN)", checkpoint_name="fs3dcnn-2026.ckpt",
        checkpoint_sha256="b2" * 32, input_roles=list(ROLES), reason="fs3dcnn runs on all four sequences.",
        tasks=[_task("grade", "HGG", {"LGG": 0.2, "HGG": 0.8})], prepared_case=volume,
        quality_flags=["bias field strong in FLAIR"], **common)
    declined = Declined(
        family="crossmodal", paper="seed 003 (cross-modality)", checkpoint_name="crossmodal-2026.ckpt",
        checkpoint_sha256="c3" * 32, input_roles=list(ROLES), stage="features", measurements=dict(MEASURES),
        reasons=[GateReason("feature_distance", 9.1, "1", None, 7.5,
                            "image-feature distance from the training data 9.10; threshold 7.50")])
    return VersionResult(
        study_instance_uid=str(pydicom.dcmread(inputs[0].example_file, stop_before_pixels=True).StudyInstanceUID),
        study_id=1, version=1, inputs=inputs, available_roles=list(ROLES), missing_roles=[],
        decisions=[Decision("mmdlm", True, "mmdlm runs on T1CE+T2+FLAIR, all present."),
                   Decision("fs3dcnn", True, "fs3dcnn runs on all four sequences."),
                   Decision("crossmodal", True, "crossmodal runs on all four sequences."),
                   Decision("promptnet", False, "promptnet does not run: T1CE is present.")],
        results=[mmdlm, fs3d], declined=[declined], quality_flags=["T2 has 155 slices"])


# --------------------------------------------------------------------------- the timed child


def child(result_json: Path, out: Path, studies: int, profile: bool) -> dict[str, Any]:
    """Runs in a fresh interpreter: import + warm (in a thread, as the runtime), the first study, ``studies`` more."""
    t0 = time.perf_counter()
    # imported here, not at the top, because this import is part of what is measured (the worker pays it
    # in its warm-up thread)
    import dicomnode.stages.report as report

    warm = getattr(report, "warm", None)
    if warm is not None:
        thread = threading.Thread(target=warm, args=(None,))
        thread.start()
        thread.join()
    figures: dict[str, Any] = {"warm_s": time.perf_counter() - t0, "has_warm": warm is not None}
    base = VersionResult.load(result_json)
    timed = getattr(report, "timed_write_reports", None)

    def one(version: int) -> dict[str, float]:
        result = dataclasses.replace(base, version=version)
        t, cpu = time.perf_counter(), time.process_time()
        split: dict[str, float] = {}
        if timed is not None:
            split = timed(result, out / f"v{version}", algorithm_version="bench", when=WHEN)[1]
        else:  # an older tree: the whole call only
            report.write_reports(result, out / f"v{version}", algorithm_version="bench", when=WHEN)
        return {"total": time.perf_counter() - t, "cpu": time.process_time() - cpu, **split}

    figures["first"] = one(1)
    figures["steady"] = [one(v) for v in range(2, studies + 2)]
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        one(studies + 2)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
        figures["profile"] = buf.getvalue()
    return figures


def _run_child(result_json: Path, out: Path, studies: int, profile: bool, tree: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("DICOMNODE_BENCH_TREE", None)
    if tree is not None:
        env["DICOMNODE_BENCH_TREE"] = str(tree.resolve())
    done = subprocess.run([sys.executable, __file__, "--child", str(result_json), "--out", str(out),
                           "--studies", str(studies)] + (["--profile"] if profile else []),
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _split(s: dict[str, float]) -> str:
    return (f"SR {s['sr']:.3f}, summary {s['summary']:.3f}, writes {s['write']:.3f}" if "sr" in s
            else "no split in this tree")


def _summary(name: str, f: dict[str, Any]) -> tuple[float, float]:
    steady = f["steady"]
    totals = [s["total"] for s in steady]
    med = statistics.median(totals)
    split = {k: statistics.median(s[k] for s in steady) for k in ("sr", "summary", "write") if k in steady[0]}
    print(f"{name}: import+warm {f['warm_s']:.2f} s{'' if f['has_warm'] else ' (import only: no warm)'}\n"
          f"  first study  {f['first']['total']:.3f} s wall, {f['first']['cpu']:.3f} s CPU ({_split(f['first'])})\n"
          f"  steady state median {med:.3f} s, max {max(totals):.3f} s wall over {len(totals)}; "
          f"CPU median {statistics.median(s['cpu'] for s in steady):.3f} s ({_split(split)})")
    return f["first"]["total"], med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10, help="steady-state studies after the first")
    ap.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    ap.add_argument("--work", type=Path, help="keep the study here (reused when present) instead of a temp folder")
    ap.add_argument("--baseline-tree", type=Path, help="another checkout to measure the same way (the peer)")
    ap.add_argument("--profile", action="store_true", help="cProfile one more steady-state call")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.out, args.studies, args.profile)))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-report-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    result = make_result(work, tuple(args.shape))
    result_json = work / "result.json"
    result.save(result_json)
    n = sum(len(s.instances) for s in result.inputs)
    print(f"setup {time.perf_counter() - t:.1f} s: {n} source instances, {len(result.results)} graded model(s) "
          f"({sum(len(m.key_slices) for m in result.results)} key slices), {len(result.declined)} declined; "
          f"{os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}")
    for old in work.glob("out-*"):
        shutil.rmtree(old)
    new = _run_child(result_json, work / "out-new", args.studies, args.profile, None)
    first, med = _summary("this tree", new)
    if args.baseline_tree:
        base = _run_child(result_json, work / "out-baseline", args.studies, False, args.baseline_tree)
        b_first, b_med = _summary(f"baseline {args.baseline_tree}", base)
        print(f"this / baseline: first study {first / b_first:.2f}, steady median {med / b_med:.2f}")
    verdict = "meets" if max(first, med) <= TARGET_S else "MISSES"
    print(f"target {TARGET_S:.1f} s per study (first after warm, and steady median): {verdict} "
          f"(first {first:.3f} s, median {med:.3f} s; load {os.getloadavg()[0]:.1f})")
    if args.profile:
        print(new["profile"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
