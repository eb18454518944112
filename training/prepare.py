"""Prepare a dataset ONCE per spec, ahead of training: ``python -m training prepare``.

Why: the clinical specs (``models.preprocess``: N4 bias field, brain extraction with deepbet,
rigid co-registration, affine registration to MNI152) take seconds to minutes per case, far
too slow to run every epoch or every repeat. This module runs :func:`models.preprocess.apply_spec`
once per (case, spec) into the cache that training reads (:class:`training.data.VolumeCache`:
``<cache>/<spec hash>/<case>.npz``, a ``models.casefile`` case file with the arrays and the
prepared case's ``meta``), optionally in parallel worker processes. Augmentation is not
preparation: it still happens per epoch, after loading.

```python
from training.prepare import prepare_dataset, protocol_specs, split_measurements

specs = protocol_specs("promptnet", config)          # {"fs3dcnn": spec, "promptnet": spec}: what it trains with
summary = prepare_dataset("data/brats", specs, "cache", workers=2, progress=True)
print(summary.line())                                # prepared / reused / failed / skipped, seconds
summary.failures                                     # [Outcome(case_id, spec name, "failed", reason), ...]
ms = split_measurements(train_cases, VolumeCache(specs["promptnet"], "cache"))   # the gate's training ranges
```

Rules:

- An entry is reused while the case id, its source files (path, size, mtime), the validated
  spec and the preprocessing code (:func:`training.data.preprocess_fingerprint`) are unchanged;
  ``rebuild=True`` prepares again regardless.
- A case that cannot be prepared is recorded with its reason (``<spec hash>/failed/<case>.json``)
  and listed in the summary; a rerun does not try it again until its sources or the code change
  (``retry_failed=True`` does). The protocols exclude such cases, list them on stderr and in
  ``<run>/prepare.json`` (:func:`exclude_failed`): never silently dropped.
- A case without a role the spec needs is "skipped" (a site's manifest may mix studies with and
  without contrast; each protocol already filters those).
- Counts are per (case, spec): a case prepared for two specs counts twice.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

from models.preprocess import SpecError, validate_spec
from training.cases import Case
from training.data import VolumeCache
from training.datasets import DatasetError, read_dataset

__all__ = [
    "Outcome",
    "PrepareSummary",
    "exclude_failed",
    "load_spec_file",
    "prepare_cases",
    "prepare_dataset",
    "protocol_specs",
    "split_measurements",
]

Status = Literal["prepared", "reused", "failed", "skipped"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Outcome:
    """What happened to one (case, spec): ``status`` and, for failed/skipped, the reason."""

    case_id: str
    spec: str            # the spec's name (e.g. "fs3dcnn")
    key: str             # its cache key (spec hash)
    status: Status
    reason: str | None = None
    seconds: float = 0.0
    recorded: bool = False   # a failure recorded by an earlier run (not tried again)


@dataclass
class PrepareSummary:
    """All outcomes of one preparation, in (spec, case) order, and the wall time."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    specs: dict[str, str] = field(default_factory=dict)   # name -> cache key
    n_cases: int = 0
    workers: int = 1

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def failed_ids(self) -> set[str]:
        return {o.case_id for o in self.failures}

    def kept(self, cases: Sequence[Case]) -> list[Case]:
        """``cases`` without those that failed for any spec (order kept)."""
        bad = self.failed_ids
        return [c for c in cases if c.case_id not in bad]

    def line(self) -> str:
        """One line for people: counts per status, seconds, and each failure with its reason."""
        head = (f"prepare: {self.n_cases} cases x {len(self.specs)} spec(s) "
                f"({', '.join(f'{n} {k}' for n, k in self.specs.items())}): prepared {self.count('prepared')}, "
                f"reused {self.count('reused')}, failed {self.count('failed')}, skipped {self.count('skipped')} "
                f"in {self.seconds:.1f} s")
        fails = self.failures
        if not fails:
            return head
        return head + "; failed: " + "; ".join(
            f"{o.case_id} [{o.spec}]: {o.reason}" + (" (recorded earlier)" if o.recorded else "") for o in fails)

    def to_dict(self) -> dict[str, Any]:
        return {"n_cases": self.n_cases, "specs": dict(self.specs), "workers": self.workers,
                "seconds": round(self.seconds, 3),
                "counts": {s: self.count(s) for s in ("prepared", "reused", "failed", "skipped")},
                "outcomes": [asdict(o) for o in self.outcomes]}


# --------------------------------------------------------------------------- specs

def protocol_specs(protocol: str, config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The specs protocol ``protocol`` trains with under ``config`` (name -> validated spec).

    The protocol module computes them (``prepare_specs(config)``, the same function its ``run``
    uses), so a cache prepared here is the one its training run finds.
    """
    from training.protocols import ProtocolError, get_protocol

    mod = get_protocol(protocol)
    fn = getattr(mod, "prepare_specs", None)
    if not callable(fn):
        raise ProtocolError(f"protocol {protocol!r} does not say which specs it trains with (no prepare_specs)")
    return {name: validate_spec(spec) for name, spec in fn(config).items()}


def load_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A spec from a JSON file: a bare spec, or an object with a ``"spec"`` key (a checkpoint's
    metadata, a cache folder's ``spec.json``); validated."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError("spec file not found", path=p) from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"not a JSON spec: {exc}", path=p) from exc
    if isinstance(data, dict) and "spec" in data and "transforms" not in data:
        data = data["spec"]
    try:
        return validate_spec(data)
    except SpecError as exc:
        raise DatasetError(f"spec does not validate: {exc}", path=p) from exc


# --------------------------------------------------------------------------- workers

_CACHES: dict[tuple[str, str], VolumeCache] = {}


def _cache(spec: Mapping[str, Any], cache_dir: str) -> VolumeCache:
    """One :class:`VolumeCache` per (spec, folder) per process (validating a spec is not free)."""
    key = (json.dumps(spec, sort_keys=True), cache_dir)
    c = _CACHES.get(key)
    if c is None or not c.dir.is_dir():
        c = _CACHES[key] = VolumeCache(spec, cache_dir)
    return c


def _init_worker(threads: int) -> None:
    """A worker's share of the cores: torch (deepbet) and ITK (registration, N4) threads."""
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        import SimpleITK as sitk  # noqa: N813

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except (ImportError, AttributeError):
        pass


def _prepare_case(specs: Sequence[tuple[str, Mapping[str, Any]]], cache_dir: str,
                  case_dict: Mapping[str, Any]) -> list[tuple[str, str, str | None, float]]:
    """Prepare and store one case for each of ``specs``; returns (spec name, status, reason,
    seconds) per spec. Runs in a worker process (or in this one when ``workers`` is 1).

    One memo for the case's specs: the clinical transforms' intermediate results (bias fields,
    brain mask, registrations) are computed once when two specs share them (PromptNet's template
    and student specs), as the node does for several checkpoints over one study.
    Every exception is a failure of THIS case, recorded with its reason: a registration that
    does not converge raises SimpleITK's RuntimeError, not a PreprocessError, and one bad case
    must not end a night of preparation. (A code bug then fails every case: the summary shows it.)
    """
    case = Case.from_dict(case_dict)
    memo: dict[str, Any] = {}
    out: list[tuple[str, str, str | None, float]] = []
    for name, spec in specs:
        cache = _cache(spec, cache_dir)
        t0 = time.perf_counter()
        try:
            pre = cache.prepare(case, memo)
        except DatasetError as exc:
            reason = exc.problem
        except MemoryError as exc:  # the machine's state, not the case's: a rerun tries again
            out.append((name, "failed", f"out of memory ({exc}); not recorded", time.perf_counter() - t0))
            continue
        except Exception as exc:  # noqa: BLE001 - recorded with its type, see the docstring
            reason = f"{type(exc).__name__}: {exc}"
        else:
            cache.store(case, pre)
            out.append((name, "prepared", None, time.perf_counter() - t0))
            continue
        reason = " ".join(reason.split())[:500]
        cache.record_failure(case, reason)
        out.append((name, "failed", reason, time.perf_counter() - t0))
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare_cases(cases: Sequence[Case], specs: Mapping[str, Mapping[str, Any]], cache_dir: str | os.PathLike[str],
                  *, workers: int = 1, retry_failed: bool = False, rebuild: bool = False,
                  progress: bool | Progress = False) -> PrepareSummary:
    """Prepare every case for every spec into ``cache_dir``, reusing valid entries.

    ``workers`` > 1 runs that many processes (spawned, each with ``cores // workers`` torch and
    ITK threads); 1 (the default, right on a 2-core machine) prepares in this process.
    ``progress``: True prints a line per prepared/failed case on stderr, or pass a callable.
    Never raises for a case: failures are in the summary (and recorded in the cache).
    """
    t0 = time.perf_counter()
    say: Progress | None = _stderr if progress is True else (progress or None)  # type: ignore[assignment]
    workers = max(1, int(workers))
    folder = str(Path(cache_dir))
    caches = {name: _cache(validate_spec(spec), folder) for name, spec in specs.items()}
    summary = PrepareSummary(specs={n: c.key for n, c in caches.items()}, n_cases=len(cases), workers=workers)
    slots: dict[tuple[str, int], Outcome] = {}
    todo: dict[int, list[str]] = {}   # case index -> the specs it still needs (one job per case)
    for name, cache in caches.items():
        for i, case in enumerate(cases):
            missing = [r for r in cache.roles if r not in case.images]
            if missing:
                slots[name, i] = Outcome(case.case_id, name, cache.key, "skipped", f"has no {', '.join(missing)}")
            elif not rebuild and cache.valid(case):
                slots[name, i] = Outcome(case.case_id, name, cache.key, "reused")
            elif not rebuild and not retry_failed and (why := cache.recorded_failure(case)) is not None:
                slots[name, i] = Outcome(case.case_id, name, cache.key, "failed", why, recorded=True)
            else:
                if retry_failed:
                    cache.clear_failure(case)
                todo.setdefault(i, []).append(name)
    jobs = sorted(todo.items())
    n_todo = sum(len(names) for _, names in jobs)
    if say:
        say(f"prepare: {len(cases)} cases x {len(caches)} spec(s): {len(slots)} settled "
            f"({sum(o.status == 'reused' for o in slots.values())} reused), {n_todo} to prepare"
            + (f", {workers} workers" if workers > 1 and jobs else ""))
    done = 0

    def settle(i: int, results: Sequence[tuple[str, str, str | None, float]]) -> None:
        nonlocal done
        for name, status, reason, secs in results:
            done += 1
            slots[name, i] = Outcome(cases[i].case_id, name, caches[name].key, status, reason,  # type: ignore[arg-type]
                                     round(secs, 3))
            if say:
                what = f"prepared in {secs:.1f} s" if status == "prepared" else f"FAILED after {secs:.1f} s: {reason}"
                say(f"prepare [{done}/{n_todo}] {name} {cases[i].case_id}: {what}")

    def job_args(i: int, names: Sequence[str]) -> tuple[Any, ...]:
        return [(n, caches[n].spec) for n in names], folder, cases[i].to_dict()

    if jobs and workers == 1:
        for i, names in jobs:
            settle(i, _prepare_case(*job_args(i, names)))
    elif jobs:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            futures: dict[Future[list[tuple[str, str, str | None, float]]], tuple[int, list[str]]] = {
                pool.submit(_prepare_case, *job_args(i, names)): (i, names) for i, names in jobs}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        i, names = futures[fut]
                        try:
                            results = fut.result()
                        except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                            # not recorded: it says nothing about the case; a rerun tries it again
                            reason = f"worker process failed ({type(exc).__name__}: {exc}); not recorded"
                            results = [(n, "failed", reason, 0.0) for n in names]
                        settle(i, results)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    summary.outcomes = [slots[name, i] for name in caches for i in range(len(cases))]
    summary.seconds = time.perf_counter() - t0
    return summary


def prepare_dataset(data: str | os.PathLike[str], specs: Mapping[str, Mapping[str, Any]],
                    cache_dir: str | os.PathLike[str], *, verify: str = "header", **kwargs: Any) -> PrepareSummary:
    """Read a dataset (anything :func:`training.datasets.read_dataset` reads: BraTS layouts, a site
    manifest of the node's converted studies, UCSF-PDGM) and :func:`prepare_cases` every case."""
    cases = read_dataset(data, verify=verify)
    return prepare_cases(cases, specs, cache_dir, **kwargs)


# --------------------------------------------------------------------------- training's side

def exclude_failed(cases: Sequence[Case], specs: Mapping[str, Mapping[str, Any]], cache_dir: str | os.PathLike[str],
                   *, record: str | os.PathLike[str] | None = None, workers: int = 1,
                   progress: bool = False, warn: Progress = _stderr) -> tuple[list[Case], PrepareSummary]:
    """What a protocol calls before splitting: prepare (or reuse) every case for its specs, and
    return the cases that can be prepared, with the summary.

    Each excluded case is reported through ``warn`` (stderr) with its reason, and the summary is
    written to ``record`` (``<run>/prepare.json``) when given, so a run says which cases it left
    out and why. Raises :class:`DatasetError` when no case can be prepared (something systematic:
    a broken install, a wrong spec), listing the first reasons.
    """
    summary = prepare_cases(cases, specs, cache_dir, workers=workers, progress=progress)
    kept = summary.kept(cases)
    for o in summary.failures:
        warn(f"excluded case {o.case_id}: it cannot be prepared for {o.spec}: {o.reason}")
    if record is not None:
        path = Path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(summary.to_dict(), indent=1))
        os.replace(tmp, path)
    if cases and not kept:
        first = "; ".join(f"{o.case_id}: {o.reason}" for o in summary.failures[:3])
        raise DatasetError(f"none of the {len(cases)} cases can be prepared ({first})")
    return kept, summary


def split_measurements(cases: Sequence[Case], cache: VolumeCache) -> list[dict[str, float]]:
    """``meta["measurements"]`` of each case as prepared by ``cache``'s spec, in ``cases`` order.

    For the export: the gate's training ranges are these values over a split's training cases
    (``models.gate.ranges_from(split_measurements(train_cases, cache))``). Reads only each entry's
    JSON header (no arrays); a case not in the cache yet is prepared first. A spec that makes no
    measurements (the older, non-clinical specs) gives empty dicts.
    """
    out: list[dict[str, float]] = []
    for case in cases:
        ms = cache.meta(case).get("measurements") or {}
        out.append({str(k): float(v) for k, v in ms.items() if v is not None})
    return out
