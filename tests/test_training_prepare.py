"""``python -m training prepare``: every case prepared ONCE per spec into the cache training reads.

A tiny synthetic cohort (small profile, 6 cases of 20x20x16 voxels) and the PromptNet protocol's two
specs at that grid. What is checked: counts and reuse, byte-identical arrays (cache vs ``apply_spec``
vs the node's prepare), failures recorded with their reason and excluded (not retried blindly),
invalidation by a source change or other preprocessing code, ``meta["measurements"]`` through the
cache, parallel workers, a site manifest over the same files, and that training reads the cache
instead of preparing again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.casefile import plain
from models.preprocess import apply_spec
from training import data as tdata
from training.cli import main
from training.cohort import generate_cohort
from training.data import CaseDataset, VolumeCache
from training.datasets import DatasetError, read_dataset, write_manifest
from training.prepare import (
    exclude_failed,
    load_spec_file,
    prepare_cases,
    prepare_dataset,
    protocol_specs,
    split_measurements,
)
from training.protocols import load_config
from training.protocols import promptnet as proto

TINY_SETS = ["model.input_shape=[20,20,16]", "data.spacing=[9.6,9.6,9.75]"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "brats"
    generate_cohort(out, profile="small", n_cases=6, shape=(20, 20, 16), spacing=(9.6, 9.6, 9.75), seed=5,
                    workers=1, hgg_fraction=0.5)
    return out


@pytest.fixture(scope="module")
def specs() -> dict[str, dict[str, Any]]:
    return protocol_specs("promptnet", load_config("promptnet", sets=TINY_SETS))


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_prepare_once_then_reuse_and_arrays_identical_to_apply_spec(cohort: Path, specs, tmp_path: Path) -> None:
    cases = read_dataset(cohort)
    lines: list[str] = []
    first = prepare_cases(cases, specs, tmp_path / "cache", progress=lines.append)
    assert (first.count("prepared"), first.count("reused"), first.count("failed")) == (12, 0, 0)
    assert len(lines) == 1 + 12 and "prepared in" in lines[-1]
    assert "prepared 12, reused 0, failed 0" in first.line()
    again = prepare_cases(cases, specs, tmp_path / "cache")
    assert (again.count("prepared"), again.count("reused")) == (0, 12)
    # the cache holds exactly what apply_spec makes (byte for byte) and the node's prepare too
    from dicomnode.stages.preprocess import prepare as node_prepare

    for name, spec in specs.items():
        cache = VolumeCache(spec, tmp_path / "cache")
        case = cases[1]
        got = cache.get(case)
        assert cache.misses == 0
        direct = apply_spec(spec, {r: case.images[r] for r in spec["roles"]})
        node = node_prepare(spec, {r: case.images[r] for r in spec["roles"]})
        for r in spec["roles"]:
            assert _same_bytes(got.arrays[r], direct.arrays[r]), (name, r)
            assert _same_bytes(got.arrays[r], node.arrays[r]), (name, r)
        assert json.dumps(dict(got.meta), sort_keys=True) == json.dumps(plain(direct.meta), sort_keys=True)
        whole = cache.load(case)
        assert whole is not None and whole.mask is not None and np.array_equal(whole.mask, direct.mask)


def test_failed_case_is_recorded_excluded_and_not_retried(cohort: Path, specs, tmp_path: Path) -> None:
    cases = read_dataset(cohort)
    broken = tmp_path / "broken_t2.nii.gz"
    broken.write_bytes(Path(cases[2].images["T2"]).read_bytes()[:200])  # truncated gzip
    bad = cases[2].to_dict()
    bad["images"]["T2"] = str(broken)
    site = [cases[0], type(cases[0]).from_dict(bad), cases[3]]
    csv = write_manifest(site, tmp_path / "manifest.csv", relative=False)
    spec = {"fs3dcnn": specs["fs3dcnn"]}
    s1 = prepare_dataset(csv, spec, tmp_path / "cache", verify="none")
    assert (s1.count("prepared"), s1.count("failed")) == (2, 1)
    (fail,) = s1.failures
    assert fail.case_id == cases[2].case_id and "read" in fail.reason and not fail.recorded
    assert cases[2].case_id in s1.line() and fail.reason in s1.line()
    cache = VolumeCache(spec["fs3dcnn"], tmp_path / "cache")
    assert cache.failure_path(site[1]).exists()
    # a rerun does not try it again (a clinical failure costs minutes), it says it was recorded
    s2 = prepare_dataset(csv, spec, tmp_path / "cache", verify="none")
    assert (s2.count("reused"), s2.count("failed")) == (2, 1) and s2.failures[0].recorded
    with pytest.raises(DatasetError, match="recorded"):
        cache.get(site[1])
    s3 = prepare_dataset(csv, spec, tmp_path / "cache", verify="none", retry_failed=True)
    assert s3.count("failed") == 1 and not s3.failures[0].recorded
    # training's side: excluded, said on stderr and in the run's prepare.json, never silently
    warned: list[str] = []
    kept, summary = exclude_failed(site, spec, tmp_path / "cache", record=tmp_path / "run" / "prepare.json",
                                   warn=warned.append)
    assert [c.case_id for c in kept] == [cases[0].case_id, cases[3].case_id]
    assert len(warned) == 1 and cases[2].case_id in warned[0]
    rec = json.loads((tmp_path / "run" / "prepare.json").read_text())
    assert rec["counts"]["failed"] == 1 and rec["outcomes"][1]["reason"] == fail.reason
    # a fixed source file is tried again (its stamp changed)
    broken.write_bytes(Path(cases[2].images["T2"]).read_bytes())
    s4 = prepare_dataset(csv, spec, tmp_path / "cache", verify="none")
    assert (s4.count("prepared"), s4.count("failed")) == (1, 0)
    never = tmp_path / "never_t2.nii.gz"
    never.write_bytes(b"not a NIfTI file")
    hopeless = type(cases[0]).from_dict({**bad, "case_id": "x", "images": {**bad["images"], "T2": str(never)}})
    with pytest.raises(DatasetError, match="none of the 1 cases"):
        exclude_failed([hopeless], spec, tmp_path / "c2", warn=lambda _: None)


def test_source_change_or_other_preprocessing_code_invalidates(cohort: Path, specs, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cases = read_dataset(cohort)[:2]
    spec = {"promptnet": specs["promptnet"]}
    prepare_cases(cases, spec, tmp_path / "cache")
    src = cases[0].images["FLAIR"]
    st = os.stat(src)
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        s = prepare_cases(cases, spec, tmp_path / "cache")
        assert [o.status for o in s.outcomes] == ["prepared", "reused"]
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(tdata, "preprocess_fingerprint", lambda: "another-code")
    s = prepare_cases(cases, spec, tmp_path / "cache")
    assert s.count("prepared") == 2
    s = prepare_cases(cases, spec, tmp_path / "cache", rebuild=True)
    assert s.count("prepared") == 2


def test_fingerprint_covers_the_preprocessing_code_not_its_documentation(tmp_path: Path) -> None:
    files = tdata._module_files(Path(tdata.__file__).resolve().parent.parent / "models" / "preprocess.py")
    names = {f.name for f in files}
    assert "preprocess.py" in names and "base.py" in names
    assert len(tdata.preprocess_fingerprint()) == 16
    (tmp_path / "a.py").write_text('def f(x):\n    """Doc."""\n    # why\n    return x+1\n')
    (tmp_path / "b.py").write_text('def f(x):\n    """Other doc."""\n\n    return x + 1  # reformatted\n')
    (tmp_path / "c.py").write_text("def f(x):\n    return x + 2\n")
    assert tdata._code_only(tmp_path / "a.py") == tdata._code_only(tmp_path / "b.py")
    assert tdata._code_only(tmp_path / "a.py") != tdata._code_only(tmp_path / "c.py")


def test_measurements_survive_the_cache(cohort: Path, specs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tdata.apply_spec

    def measured(spec: Any, volumes: Any, **kw: Any) -> Any:  # stands in for the clinical transforms' meta
        pre = real(spec, volumes, **kw)
        pre.meta["measurements"] = {"brain_volume_ml": float(pre.arrays["T1"].size) + 0.25,
                                    "slice_thickness_mm/T2": 9.75, "coregister_mi/FLAIR": 0.5}
        return pre

    monkeypatch.setattr(tdata, "apply_spec", measured)
    cases = read_dataset(cohort)[:3]
    prepare_cases(cases, {"fs3dcnn": specs["fs3dcnn"]}, tmp_path / "cache")
    monkeypatch.setattr(tdata, "apply_spec", lambda *a, **k: pytest.fail("prepared again instead of read"))
    cache = VolumeCache(specs["fs3dcnn"], tmp_path / "cache")
    ms = split_measurements(list(reversed(cases)), cache)
    want = {"brain_volume_ml": 20 * 20 * 16 + 0.25, "slice_thickness_mm/T2": 9.75, "coregister_mi/FLAIR": 0.5}
    assert ms == [want] * 3
    assert cache.get(cases[0]).measurements == want
    assert "training_cache" not in cache.get(cases[0]).meta


def test_parallel_workers_give_the_same_bytes(cohort: Path, specs, tmp_path: Path) -> None:
    cases = read_dataset(cohort)[:3]
    spec = {"fs3dcnn": specs["fs3dcnn"]}
    s = prepare_cases(cases, spec, tmp_path / "par", workers=2)
    assert s.count("prepared") == 3 and s.workers == 2, s.line()
    prepare_cases(cases, spec, tmp_path / "seq", workers=1)
    a, b = VolumeCache(spec["fs3dcnn"], tmp_path / "par"), VolumeCache(spec["fs3dcnn"], tmp_path / "seq")
    for c in cases:
        x, y = a.get(c), b.get(c)
        assert all(_same_bytes(x.arrays[r], y.arrays[r]) for r in x.arrays)


def test_cli_prepare_then_training_reads_the_cache(cohort: Path, specs, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    rc = main(["prepare", "promptnet", "--data", str(cohort), "--cache", str(tmp_path / "cache"), *sets])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "prepared 12, reused 0, failed 0, skipped 0" in out
    assert "prepare [12/12]" in err
    # a spec file (here the cache's own spec.json) gives the same key: all reused, nothing to do
    key = VolumeCache(specs["fs3dcnn"], tmp_path / "cache").key
    spec_file = tmp_path / "cache" / key / "spec.json"
    assert load_spec_file(spec_file) == specs["fs3dcnn"]
    rc = main(["prepare", "--spec", str(spec_file), "--data", str(cohort), "--cache", str(tmp_path / "cache"),
               "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and "prepared 0, reused 6" in out and err == ""
    assert main(["prepare", "--data", str(cohort), "--cache", str(tmp_path / "cache")]) == 2
    assert "PROTOCOL" in capsys.readouterr().err
    # training with data.cache_dir = the prepared cache: the protocol's specs hit every entry and its
    # datasets read them (augmentation still per item); nothing is prepared again
    monkeypatch.setattr(tdata, "apply_spec", lambda *a, **k: pytest.fail("prepared again instead of read"))
    cfg = load_config("promptnet", sets=[*TINY_SETS, f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"])
    cases = read_dataset(cohort)
    kept, summary = exclude_failed(cases, proto.prepare_specs(cfg), proto.cache_root(cfg, tmp_path / "run"))
    assert len(kept) == 6 and summary.count("reused") == 12
    ds = CaseDataset(cases, VolumeCache(proto.prepare_specs(cfg)["promptnet"], tmp_path / "cache"),
                     augment=lambda arrays, rng: {r: a[::-1].copy() for r, a in arrays.items()})
    item = ds[0]
    assert item["T1"].shape == (20, 20, 16) and ds.cache.hits == 1 and ds.cache.misses == 0


def test_clinical_spec_through_the_cache(cohort: Path, tmp_path: Path) -> None:
    """The real clinical transforms (N4, co-registration, brain extraction, MNI152 grid) on two cases:
    the cached arrays are byte-identical to ``apply_spec`` without a memo, and the measurements and
    the template mask survive."""
    import models.preprocess as mp
    from training.prepare import _init_worker

    _init_worker(1)  # one torch (deepbet) and ITK thread: the 2-core machine is shared
    cases = read_dataset(cohort)[:2]
    spec = mp.clinical_volume_spec(["T1", "T1CE", "T2", "FLAIR"], (20, 20, 16), spacing=(9.6, 9.6, 9.75))
    s = prepare_cases(cases, {"clinical": spec}, tmp_path / "cache")
    assert s.count("prepared") == 2, s.line()
    cache = VolumeCache(spec, tmp_path / "cache")
    direct = apply_spec(spec, {r: cases[0].images[r] for r in spec["roles"]})
    got = cache.load(cases[0])
    assert got is not None
    assert all(_same_bytes(got.arrays[r], direct.arrays[r]) for r in spec["roles"])
    assert direct.meta["measurements"] and got.meta["measurements"] == plain(direct.meta["measurements"])
    assert split_measurements(cases[:1], cache) == [got.meta["measurements"]]
    assert direct.template_mask is not None and _same_bytes(got.template_mask, direct.template_mask)
