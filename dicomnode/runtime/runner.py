"""The five steps of one study version, and the runner a worker process calls for each delivery.

Each step reads what the previous one left in the version's work directory
(``data_dir/work/study-<id>/v<version>/``) and the index, writes its own output
atomically, and is safe to run again: conversion reuses converted files,
preprocessing rewrites the same arrays, inference the same result file, the
report has UIDs derived from its inputs, and the outbox ignores a report it
already holds. So a redelivery after a lost worker costs time, never a second,
different report.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.base import ROLES

from dicomnode.config import Settings
from dicomnode.index.studies import Index, VersionInfo
from dicomnode.index.jobs import STAGES, Jobs, holder_id
from dicomnode.index.reports import Reports
from dicomnode.handoff import Decision, Declined, GateReason, InputSeries, ModelResult, SourceRef, VersionResult

log = logging.getLogger(__name__)

NEXT_STAGE: dict[str, str | None] = {s: (STAGES[i + 1] if i + 1 < len(STAGES) else None) for i, s in enumerate(STAGES)}


def package_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("dicomnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def checkpoint_listing(settings: Settings) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of the checkpoint directory's files: cheap to compare, changes when a file does."""
    root = settings.checkpoints_path
    if not root.is_dir():
        return ()
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file()))


def gate_settings(settings: Settings) -> Any:
    """The node's gate settings as :class:`models.gate.GateSettings` (validated there too)."""
    from models.gate import GateSettings

    return GateSettings(margin=settings.gate_margin, feature_factor=settings.gate_feature_factor,
                        unchecked=settings.gate_unchecked)


def floor_settings(settings: Settings) -> Any:
    """The node's floor on held-out metrics as :class:`models.gate.FloorSettings` (validated there too)."""
    from models.gate import FloorSettings

    return FloorSettings(auc=settings.floor_auc, sensitivity=settings.floor_sensitivity,
                         specificity=settings.floor_specificity)


def loosened_text(gate: Any, floor: Any) -> str | None:
    """The SR's sentence(s) saying what this site loosened: the input gate and/or the floor (None: nothing)."""
    return " ".join(t for t in (gate.describe(), floor.describe()) if t) or None


def _reasons(findings: Any) -> list[dict[str, Any]]:
    """Gate findings as plain data for plan.json (the fields of :class:`GateReason`)."""
    return [{"name": f.name, "value": f.value, "unit": f.unit, "low": f.low, "high": f.high, "reason": f.reason}
            for f in findings]


def open_registry(settings: Settings) -> Any:
    """The checkpoint registry of ``checkpoints_dir`` (empty when the directory does not exist)."""
    from models.registry import CheckpointRegistry

    root = settings.checkpoints_path
    return CheckpointRegistry(root if root.is_dir() else [], pins=settings.checkpoint_pins)


@dataclass
class Runtime:
    """What a worker process needs to run steps: built once per process (after a prefork child forks)."""

    settings: Settings
    index: Index
    send: Callable[[int, str], None]  # queue a step (the next one, after this one finishes)
    after_dispatch: Callable[[], None] | None = None
    holder: str = field(default_factory=holder_id)
    _registry: Any = None
    _cache: Any = None
    _outbox: Any = None

    def __post_init__(self) -> None:
        self.jobs = Jobs(self.index)
        self.reports = Reports(self.index, self.settings.data_path)

    # -- shared, lazily built parts -------------------------------------------------------------

    _listing: tuple[tuple[str, int, int], ...] | None = None

    def use_registry(self, registry: Any, listing: tuple[tuple[str, int, int], ...]) -> None:
        """Start from checkpoints already validated (the node's start-up check), instead of hashing them again."""
        self._registry, self._listing = registry, listing

    @property
    def registry(self) -> Any:
        """The checkpoints, validated again only when the directory changed (validation hashes every weight)."""
        listing = checkpoint_listing(self.settings)
        if self._registry is None or listing != self._listing:
            self.use_registry(open_registry(self.settings), listing)
        return self._registry

    @property
    def cache(self) -> Any:
        from dicomnode.stages.infer import ModelCache

        if self._cache is None:
            self._cache = ModelCache()
        return self._cache

    @property
    def outbox(self) -> Any:
        from dicomnode.stages.dispatch import Outbox

        if self._outbox is None:
            self._outbox = Outbox(self.index, self.settings)
        return self._outbox

    def work_dir(self, info: VersionInfo) -> Path:
        d = self.settings.data_path / "work" / f"study-{info.study_id}" / f"v{info.version}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- the runner -----------------------------------------------------------------------------

    def __call__(self, version_id: int, stage: str) -> None:
        s = self.settings
        claim = self.jobs.claim(version_id, stage, holder=self.holder, lease_s=s.task_hard_time_limit_s,
                                max_deliveries=s.max_deliveries)
        if claim.outcome != "run":
            log.info("version %d %s: not run (%s)", version_id, stage, claim.outcome)
            return
        info = self.index.version_info(version_id)
        t0 = time.perf_counter()
        try:
            if info is None:
                raise RuntimeError(f"study version {version_id} is not in the index")
            detail = STEP_FUNCS[stage](self, info)
        except BaseException as exc:  # SoftTimeLimitExceeded included; a hard kill never gets here
            seconds = time.perf_counter() - t0
            text = f"{type(exc).__name__}: {exc}"
            log.error("version %d %s failed after %.1f s: %s", version_id, stage, seconds, text)
            log.debug("%s", traceback.format_exc())
            self.jobs.fail(version_id, stage, holder=self.holder, error=text, seconds=seconds)
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - t0
        nxt = NEXT_STAGE[stage]
        if self.jobs.finish(version_id, stage, holder=self.holder, seconds=seconds, detail=detail, next_stage=nxt):
            log.info("study %d version %d: %s done in %.2f s", info.study_id, info.version, stage, seconds)
            if nxt:
                self.send(version_id, nxt)


# -- the steps ----------------------------------------------------------------------------------


def _graded_inputs(rt: Runtime, info: VersionInfo) -> dict[str, tuple[str, list[Path]]]:
    """The selected series of each grading role, as absolute file lists."""
    out: dict[str, tuple[str, list[Path]]] = {}
    for vi in rt.index.version_inputs(info.version_id):
        if vi.status == "selected" and vi.role in ROLES:
            out[vi.role] = (vi.series_instance_uid, [rt.settings.data_path / p for p, _, _ in vi.instances])
    return out


def step_convert(rt: Runtime, info: VersionInfo) -> dict[str, Any]:
    from dicomnode.stages.convert import convert_version

    converted = convert_version(_graded_inputs(rt, info), rt.work_dir(info) / "nifti")
    return {role: {"converter": c.converter, "error": c.error, "seconds": round(c.seconds, 3)}
            for role, c in converted.items()}


def _converted(rt: Runtime, info: VersionInfo) -> dict[str, Any]:
    from dicomnode.stages.convert import convert_version

    return convert_version(_graded_inputs(rt, info), rt.work_dir(info) / "nifti")  # reuses the files on disk


def step_preprocess(rt: Runtime, info: VersionInfo) -> dict[str, Any]:
    """Prepare the case for each selected checkpoint (its own spec) and check its measurements (the gate).

    A model whose case falls outside its checkpoint's training ranges (or
    fails a quality check that says the input is unlike its training data) is
    marked declined in ``plan.json`` with the findings; the case is still
    saved, so the summary image can show what the model would have seen.
    """
    import json

    from models.clinical import DirCache
    from models.gate import case_measurements, check_floor

    from dicomnode.stages.preprocess import gate_case, prepare, save_case

    converted = _converted(rt, info)
    available = [r for r in ROLES if r in converted and converted[r].nifti is not None]
    gs = gate_settings(rt.settings)
    floor = floor_settings(rt.settings)
    plan: dict[str, Any] = {"available": available,
                            "decisions": [{"family": d.family, "runs": d.runs, "reason": d.reason}
                                          for d in rt.registry.explain(available)],
                            "runs": [], "gate_loosened": loosened_text(gs, floor)}
    prep_dir = rt.work_dir(info) / "prep"
    prep_dir.mkdir(exist_ok=True)
    for sel in rt.registry.select(available):
        ck = sel.checkpoint
        entry: dict[str, Any] = {"family": sel.family.name, "sha256": ck.sha256, "reason": sel.reason,
                                 "case": None, "error": None, "flags": [], "measurements": {}, "gate": []}
        try:
            # one memo per study version: several checkpoints' specs (and a redelivered step) pay for
            # bias fields, registrations and the brain mask once
            case = prepare(ck.spec, {r: Path(converted[r].nifti) for r in ck.input_roles},
                           cache=DirCache(rt.work_dir(info) / "prep-memo"))
            path = prep_dir / f"{ck.sha256[:16]}.npz"
            save_case(case, path)
            entry["case"] = str(path)
            entry["flags"] = list(case.meta.get("quality_flags", []))
            entry["measurements"] = case_measurements(case.meta)
            entry["gate"] = _reasons(gate_case((ck.extra or {}).get("gate"), ck.spec, case, gs))
            # the floor: a model whose GRADE the checkpoint's held-out metrics do not support is declined
            # (with every task's reasons); a weaker IDH or 1p/19q alone is withheld at inference
            under = check_floor(ck.metrics, list(sel.family.tasks), floor)
            if "grade" in under:
                entry["gate"] += _reasons([f for fs in under.values() for f in fs])
            if entry["gate"]:
                log.info("study %d version %d: %s declined by the gate (%d finding(s))", info.study_id,
                         info.version, sel.family.name, len(entry["gate"]))
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("study %d version %d: preprocessing for %s failed: %s", info.study_id, info.version,
                        sel.family.name, entry["error"])
        plan["runs"].append(entry)
    tmp = rt.work_dir(info) / "plan.json.tmp"
    tmp.write_text(json.dumps(plan, indent=1))
    tmp.replace(rt.work_dir(info) / "plan.json")
    return {"available": available, "models": [r["family"] for r in plan["runs"] if r["case"] and not r["gate"]],
            "declined": {r["family"]: [g["reason"] for g in r["gate"]] for r in plan["runs"] if r["gate"]},
            "errors": {r["family"]: r["error"] for r in plan["runs"] if r["error"]}}


def _input_series(rt: Runtime, info: VersionInfo, converted: dict[str, Any]) -> list[InputSeries]:
    out = []
    for vi in rt.index.version_inputs(info.version_id):
        if vi.status != "selected" or vi.role not in ROLES:
            continue
        c = converted.get(vi.role)
        out.append(InputSeries(
            role=vi.role, series_instance_uid=vi.series_instance_uid, series_number=vi.series_number,
            series_description=vi.series_description,
            instances=[SourceRef(vi.series_instance_uid, cls, uid) for _, cls, uid in vi.instances],
            example_file=str(rt.settings.data_path / vi.instances[0][0]),
            converter=getattr(c, "converter", None), nifti=str(c.nifti) if c is not None and c.nifti else None,
            files=[str(rt.settings.data_path / p) for p, _, _ in vi.instances]))
    return out


def step_infer(rt: Runtime, info: VersionInfo) -> dict[str, Any]:
    """Run each model the gate let through; the feature distance is checked before a prediction is trusted.

    A declined model (measurements at preprocess, features here) produces a
    :class:`Declined` record and no grade. When no model grades, the
    cannot-grade sentence names every declined model with its findings.
    """
    import json

    from models.families import resolve_family
    from models.registry import Selection

    from dicomnode.stages.infer import check_case_features, run_model
    from dicomnode.stages.preprocess import load_case

    wd = rt.work_dir(info)
    plan = json.loads((wd / "plan.json").read_text())
    converted = _converted(rt, info)
    by_sha = {c.sha256: c for c in rt.registry.checkpoints}
    gs = gate_settings(rt.settings)
    floor = floor_settings(rt.settings)
    results: list[ModelResult] = []
    declined: list[Declined] = []
    flags: list[str] = []
    gated = False  # did any model reach the gate (the SR then says whether it was loosened)
    for run in plan["runs"]:
        if run["error"] or not run["case"]:
            flags.append(f"{run['family']} did not run: preprocessing failed ({run['error']})")
            continue
        info_ck = by_sha.get(run["sha256"])
        if info_ck is None:
            flags.append(f"{run['family']} did not run: its checkpoint {run['sha256'][:12]} is no longer registered")
            continue
        family = resolve_family(info_ck.family)
        gated = True

        def decline(reasons: list[dict[str, Any]], stage: str, case_flags: list[str]) -> Declined:
            return Declined(family=family.name, paper=family.paper, checkpoint_name=info_ck.path.name,
                            checkpoint_sha256=info_ck.sha256, input_roles=list(info_ck.input_roles),
                            reasons=[GateReason(**r) for r in reasons], stage=stage,
                            measurements=dict(run.get("measurements") or {}), prepared_case=run["case"],
                            quality_flags=list(case_flags))

        if run.get("gate"):
            declined.append(decline(run["gate"], "measurements", run.get("flags", [])))
            continue
        sel = Selection(info_ck, family, run["reason"])
        try:
            case = load_case(Path(run["case"]))
            check = check_case_features(sel, case, rt.cache, gs, device=rt.settings.device)
            if check.finding is not None:
                log.info("study %d version %d: %s declined by the gate (features)", info.study_id, info.version,
                         family.name)
                declined.append(decline(_reasons([check.finding]), "features", case.meta.get("quality_flags", [])))
                continue
            result = run_model(sel, case, converted, rt.cache, device=rt.settings.device, floor=floor)
        except Exception as exc:
            log.warning("study %d version %d: %s failed: %s", info.study_id, info.version, run["family"], exc)
            flags.append(f"{run['family']} did not run: inference failed ({type(exc).__name__}: {exc})")
            continue
        result.prepared_case = run["case"]
        result.feature_distance, result.feature_threshold = check.distance, check.threshold
        results.append(result)
    available = list(plan["available"])
    missing = [r for r in ROLES if r not in available]
    conversion_errors = [f"{role} could not be converted: {c.error}" for role, c in converted.items() if c.error]
    cannot = None
    if not results:
        reasons = [d.sentence() for d in declined]
        reasons += [d["reason"] for d in plan["decisions"] if not d["runs"]] + conversion_errors + flags
        cannot = ("No model could grade this study. " + " ".join(reasons)).strip()
    loosened = (loosened_text(gs, floor) or plan.get("gate_loosened")) if gated else None
    result = VersionResult(
        study_instance_uid=info.study_instance_uid, study_id=info.study_id, version=info.version,
        inputs=_input_series(rt, info, converted), available_roles=available, missing_roles=missing,
        decisions=[Decision(**d) for d in plan["decisions"]], results=results, cannot_grade=cannot,
        quality_flags=conversion_errors + flags + sorted({f for r in plan["runs"] for f in r.get("flags", [])}),
        declined=declined, gate_loosened=loosened or None,
        )
    result.save(wd / "result.json")
    return {"models": [r.family for r in results], "cannot_grade": cannot,
            "declined": {d.family: [r.reason for r in d.reasons] for d in declined},
            "findings": {r.family: {t.task: [t.label, round(t.probability, 4)] for t in r.tasks} for r in results}}


def step_report(rt: Runtime, info: VersionInfo) -> dict[str, Any]:
    from dicomnode.stages.report import write_reports

    wd = rt.work_dir(info)
    result = VersionResult.load(wd / "result.json")
    result.timings = {stage: v.get("seconds") or 0.0 for stage, v in rt.jobs.of_version(info.version_id).items()
                      if stage in ("convert", "preprocess", "infer")}
    result.supersedes = rt.reports.previous(info.study_id, info.version)
    if result.cannot_grade and not rt.settings.report_cannot_grade:
        rt.reports.record(info, [], result, sent_report=False)
        return {"report": None, "why": "cannot grade and report_cannot_grade is off", "cannot_grade": result.cannot_grade}
    out_dir = rt.settings.data_path / "reports" / f"study-{info.study_id}" / f"v{info.version}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_reports(result, out_dir, summary_image=rt.settings.summary_image,
                          algorithm_version=package_version())
    rt.reports.record(info, files, result, sent_report=True)
    return {"files": [str(p.relative_to(rt.settings.data_path)) for p in files],
            "cannot_grade": result.cannot_grade}


def step_dispatch(rt: Runtime, info: VersionInfo) -> dict[str, Any]:
    files = rt.reports.files(info.version_id)
    if not files:
        return {"queued": 0, "why": "no report for this version"}
    if not rt.settings.destinations:
        return {"queued": 0, "why": "no destinations configured"}
    paths = [rt.settings.data_path / f for f in files]
    n = rt.outbox.enqueue(paths, study_id=info.study_id, version_id=info.version_id)
    if rt.after_dispatch is not None:
        rt.after_dispatch()
    else:
        rt.outbox.pump()
    return {"queued": n, "destinations": [d.name for d in rt.settings.destinations]}


STEP_FUNCS: dict[str, Callable[[Runtime, VersionInfo], dict[str, Any]]] = {
    "convert": step_convert, "preprocess": step_preprocess, "infer": step_infer,
    "report": step_report, "dispatch": step_dispatch,
}
