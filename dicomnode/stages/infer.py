"""One prepared case + one selected checkpoint -> a :class:`~dicomnode.handoff.ModelResult`.

Why this shape: a GPU worker runs many studies with few models, so
:class:`ModelCache` loads each checkpoint once per process (keyed by its
content hash, and re-verified when the file changes on disk), and
:func:`run_model` does the rest per case: predict, calibrate, label, and map
MMDLM's key slices back to source DICOM images for the report.

Device: ``"auto"`` is CUDA when ``torch.cuda.is_available()`` at call time,
else CPU. Nothing here touches CUDA at import time, so a Celery parent process
that imports this module can still fork workers (NOTES.md). Inference runs
under ``torch.inference_mode``; autocast (bf16 where the GPU supports it, else
fp16) only on CUDA: on CPU, fp32 is what the models were validated in.

Calibration: training fits a temperature T on validation LOGITS
(``training.calibration``: p = softmax(z / T), or sigmoid(z / T) for one
logit) and stores it in the checkpoint: one ``temperature`` for single-task
families, ``extra["temperatures"][task]`` for MMDLM (one number cannot
calibrate three tasks). ``predict`` returns probabilities, not logits, and
``models`` has no helper for this (``training.calibration.apply_temperature``
takes logits and the node may not import ``training``), so :func:`calibrate`
uses log p, which differs from the logits by a per-row constant:
softmax(log p / T) == softmax(z / T) exactly, and for a sigmoid head
p = (1 - s(z), s(z)) = softmax((0, z)), so the same formula gives s(z / T).
Probabilities are clipped at float32's smallest normal number before the log,
so a class the network gave exactly 0 stays finite.

Labels: a binary task's label is its positive class (the second of
``models.vocab.TASKS[task]``: HGG, IDH-mutant, 1p/19q co-deleted) when the
calibrated P(positive) >= the checkpoint's operating threshold for the task
(``LoadedCheckpoint.thresholds``, chosen by training on validation data:
``training.operating``), else the other class. A checkpoint without a stored
threshold (written before thresholds existed) is labelled at 0.5, i.e. by
argmax, as before. Why not argmax always: a network trained on a cohort of
mostly HGG puts P(HGG) above 0.5 for nearly every case, so argmax calls every
case HGG (specificity 0); the threshold chosen on validation data corrects
that, and the held-out sensitivity and specificity the floor checks were
measured at that same threshold.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.handoff import (ConvertedSeries, Declined, InputSeries, KeySlice, ModelResult, PreparedPlan, PreparedRun,
                               SourceRef, TaskResult, VersionResult, load_converted)
from dicomnode.index.studies import VersionInfo
from dicomnode.stages.context import StageContext
from dicomnode.stages.models import floor_settings, gate_settings, loosened_text, registry
from dicomnode.stages.preprocess import gate_reasons
from models.casefile import load_case
from models.families import resolve_family
from models.vocab import ROLES, TASKS
from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.gate import (TASK_TITLES, FeatureStats, FloorSettings, GateSettings, case_measurements, check_features,
                         withheld_sentence)
from models.preprocess import PreprocessedCase, to_batch, validate_spec
from models.registry import CheckpointInfo, Selection

log = logging.getLogger(__name__)

# predict() of these families takes gradients inside (Grad-CAM without an off switch), which
# inference_mode forbids; they run under their own no_grad for the forward instead.
_NEEDS_AUTOGRAD: frozenset[str] = frozenset({"crossmodal"})
# A key slice whose centre is farther than this from every source plane lies outside the series.
OUTSIDE_SERIES_MM = 10.0
# |cos| between the model's slice normal and the series' below this: not the same plane.
SAME_PLANE_COS = 0.9


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available now, else ``cpu``; anything else as given (``cuda`` checked)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return dev


@dataclass
class _Entry:
    loaded: LoadedCheckpoint
    stat: tuple[int, int]  # (size, mtime_ns) of the file when it was loaded


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class ModelCache:
    """Checkpoints loaded once per process, keyed by (sha256, device).

    A hit re-checks the file's size and modification time; when they changed,
    the file is loaded and verified again, and a file whose content hash no
    longer matches the one it was listed with is refused
    (:class:`models.checkpoint.CheckpointError`) and dropped from the cache.
    Thread-safe (a threads-pool worker may share one cache).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self.loads = 0  # how many times a file was read (tests, metrics)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, info: CheckpointInfo, device: str | torch.device = "auto") -> LoadedCheckpoint:
        """The loaded checkpoint for ``info`` on ``device``, loading (and validating) it at most once."""
        dev = resolve_device(device)
        key = (info.sha256, str(dev))
        with self._lock:
            entry = self._entries.get(key)
            try:
                now = _stat(info.path)
            except OSError as exc:
                self._entries.pop(key, None)
                raise CheckpointError(f"{info.path.name}: cannot be read: {exc}") from exc
            if entry is not None and entry.stat == now:
                return entry.loaded
            self._entries.pop(key, None)
            loaded = info.load(map_location=str(dev))  # verifies the hash against the listing
            self.loads += 1
            loaded.model.eval()
            self._entries[key] = _Entry(loaded, now)
            log.info("loaded checkpoint %s (%s, sha256 %s...) on %s", info.path.name, info.family,
                     info.sha256[:12], dev)
            return loaded


# --------------------------------------------------------------------------- calibration


def temperatures_of(ckpt: LoadedCheckpoint) -> dict[str, float | None]:
    """The calibration temperature per task of a checkpoint (None: not calibrated for that task)."""
    tasks = list(ckpt.labels)
    if ckpt.temperature is not None:
        return {t: float(ckpt.temperature) for t in tasks}
    per_task = (ckpt.extra or {}).get("temperatures")
    out: dict[str, float | None] = {t: None for t in tasks}
    if isinstance(per_task, Mapping):
        for t in tasks:
            value = per_task.get(t)
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                out[t] = float(value)
    return out


def calibrate(probabilities: np.ndarray | torch.Tensor, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities (rows over classes), from probabilities: softmax(log p / T)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    p = np.asarray(probabilities.detach().cpu() if isinstance(probabilities, torch.Tensor) else probabilities,
                   dtype=np.float64)
    z = np.log(np.clip(p, np.finfo(np.float32).tiny, None)) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- key slices


def _slice_world_centre(case: PreprocessedCase, axis: int, index: int) -> np.ndarray:
    """World (RAS, mm) position of the centre of grid slice ``index`` along ``axis`` of the final grid."""
    shape = case.meta.get("shape")
    if not shape:
        raise ValueError("the prepared case has no grid shape in meta")
    ijk = [(int(n) - 1) / 2.0 for n in shape]
    ijk[axis] = float(index)
    return (np.asarray(case.affine, dtype=np.float64) @ np.array([*ijk, 1.0]))[:3]


def _key_slices(case: PreprocessedCase, explanations: Mapping[str, torch.Tensor], roles: tuple[str, ...],
                converted: Mapping[str, ConvertedSeries]) -> tuple[list[KeySlice], list[str]]:
    out: list[KeySlice] = []
    flags: list[str] = []
    sl = case.meta.get("slices") or {}
    axis = int(sl.get("axis", 2))
    if case.slice_indices is None:
        return out, flags
    grid_normal = np.asarray(case.affine, dtype=np.float64)[:3, axis]
    grid_normal = grid_normal / np.linalg.norm(grid_normal) * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    for role in roles:
        key = explanations.get(f"key_slices/{role}")
        attention = explanations.get(f"slice_attention/{role}")
        if key is None or attention is None:
            continue
        series = converted.get(role)
        if series is None or not series.images or series.normal is None:
            flags.append(f"key slices of {role} cannot be mapped to source images: no converted {role} series")
            continue
        cos = abs(float(grid_normal @ np.asarray(series.normal)))
        if cos < SAME_PLANE_COS:
            flags.append(f"key slices of {role} are slices of the model's grid across the series' plane "
                         f"(the series is acquired in another orientation); each cites the source image "
                         f"through the slice centre")
        far = 0
        for pos in key[0].tolist():
            if pos < 0 or pos >= len(case.slice_indices):
                continue
            grid_index = int(case.slice_indices[pos])
            if grid_index < 0:
                continue
            ref, distance = series.nearest(_slice_world_centre(case, axis, grid_index))
            far += distance > OUTSIDE_SERIES_MM
            out.append(KeySlice(role=role, attention=float(attention[0, pos]), ref=ref, grid_index=grid_index))
        if far:
            flags.append(f"{far} key slice(s) of {role} lie more than {OUTSIDE_SERIES_MM:g} mm from every "
                         f"source image of the series")
    return out, flags


# --------------------------------------------------------------------------- running a model


def _autocast_dtype(dev: torch.device, autocast: bool) -> torch.dtype | None:
    if not autocast or dev.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def _grad_mode(family: str) -> Iterator[None]:
    if family in _NEEDS_AUTOGRAD:
        yield
    else:
        with torch.inference_mode():
            yield


def operating_threshold(ckpt: LoadedCheckpoint, task: str) -> tuple[float, str]:
    """(threshold on the calibrated P(positive), source) for one task: the checkpoint's, else (0.5, "default")."""
    stored = (ckpt.thresholds or {}).get(task)
    if stored is None:
        return 0.5, "default"
    return float(stored), "validation"


def label_at(names: tuple[str, ...], p: np.ndarray, threshold: float) -> str:
    """The class a case gets: for a binary task, the positive (second) class iff P(positive) >= ``threshold``.

    ``>=`` as in ``training.metrics.binary_metrics``, so the node labels exactly as the stored
    held-out metrics were counted. Other numbers of classes: argmax (no threshold applies).
    """
    if len(names) == 2:
        return names[1] if float(p[1]) >= threshold else names[0]
    return names[int(np.argmax(p))]


def floor_threshold_mismatch(metrics: Mapping[str, Any] | None, task: str, family_tasks: list[str],
                             threshold: float) -> str | None:
    """Why the held-out sensitivity/specificity do not describe this task's labels (None: they do).

    The floor judges sensitivity and specificity, which depend on the threshold. Training
    records the threshold they were counted at (``metrics["test"]["threshold"]``, or per task
    for multi-task checkpoints); when that differs from the threshold the node labels with,
    the stored figures describe another operating point, and the task must not be reported
    on their strength. A checkpoint that records no threshold is judged as before.
    """
    test = (metrics or {}).get("test")
    if not isinstance(test, Mapping):
        return None
    found = test.get(task) if isinstance(test.get(task), Mapping) else (test if len(family_tasks) == 1 else None)
    recorded = found.get("threshold") if isinstance(found, Mapping) else None
    if not isinstance(recorded, (int, float)) or isinstance(recorded, bool) or not math.isfinite(recorded):
        return None
    if abs(float(recorded) - threshold) <= 1e-9:
        return None
    return (f"{TASK_TITLES.get(task, task)} not reported: its held-out sensitivity and specificity were "
            f"measured at threshold {float(recorded):.3f}, but the checkpoint labels at {threshold:.3f}")


def who_consistent(tasks: list[TaskResult]) -> tuple[list[TaskResult], list[str]]:
    """The molecular answers a neuropathologist accepts (WHO CNS5, 2021), and why anything was left out.

    1p/19q co-deletion together with an IDH mutation defines oligodendroglioma;
    "IDH-wildtype, 1p/19q co-deleted" is not a category, and a 1p/19q status
    without an IDH status means nothing. So the 1p/19q answer is reported only
    when the same model predicts IDH-mutant; otherwise it is dropped and the
    report says why. Grade and IDH are left as they are.
    """
    by = {t.task: t for t in tasks}
    codel = by.get("1p19q")
    if codel is None:
        return tasks, []
    idh = by.get("idh")
    if idh is not None and idh.label == TASKS["idh"][1]:  # IDH-mutant
        return tasks, []
    if idh is None:
        why = "1p/19q not reported: this model gives no IDH status, and 1p/19q co-deletion is defined only in " \
              "IDH-mutant gliomas (WHO CNS5)"
    else:
        why = (f"1p/19q not reported: the model predicts {idh.label} (P = {idh.probabilities[idh.label]:.2f}); "
               f"1p/19q co-deletion is defined only in IDH-mutant gliomas (oligodendroglioma, WHO CNS5)")
    return [t for t in tasks if t.task != "1p19q"], [why]


def withhold_under_floor(tasks: list[TaskResult], metrics: Mapping[str, Any] | None, family_tasks: list[str],
                         floor: FloorSettings | None) -> tuple[list[TaskResult], list[str]]:
    """The tasks the checkpoint's held-out metrics support (``models.gate`` floor), and why any were left out.

    Runs before :func:`who_consistent`, so a withheld IDH answer never shows up, not even in
    the sentence that explains a dropped 1p/19q. Without its IDH answer a 1p/19q answer means
    nothing (WHO CNS5), so it is withheld with it. The grade is declined earlier (the gate, at
    preprocessing); should it reach here under the floor, it is withheld like any task.
    A task whose held-out sensitivity/specificity were counted at another threshold than the one
    that labelled it (``TaskResult.threshold``) is withheld too (:func:`floor_threshold_mismatch`).
    """
    if floor is None:
        return tasks, []
    floors = floor.floors()
    flags: dict[str, str] = {}
    for t in tasks:
        why = None
        if "sensitivity" in floors or "specificity" in floors:
            why = floor_threshold_mismatch(metrics, t.task, family_tasks, t.threshold)
        why = why or withheld_sentence(metrics, t.task, family_tasks, floor)
        if why is not None:
            flags[t.task] = why
    if "idh" in flags and "1p19q" not in flags and any(t.task == "1p19q" for t in tasks):
        flags["1p19q"] = ("1p/19q not reported: the IDH status it depends on is not reported "
                          "(WHO CNS5 reads 1p/19q only together with IDH)")
    for task, why in flags.items():
        log.info("%s withheld: %s", task, why)
    return [t for t in tasks if t.task not in flags], [flags[t.task] for t in tasks if t.task in flags]


def run_model(selection: Selection, case: PreprocessedCase, converted: Mapping[str, ConvertedSeries],
              cache: ModelCache, *, device: str | torch.device = "auto", autocast: bool = True,
              key_slices: int | None = None, floor: FloorSettings | None = None) -> ModelResult:
    """Run one selected checkpoint on a case prepared with its spec, and say what it found.

    Raises :class:`models.checkpoint.CheckpointError` for a checkpoint that is
    refused (changed file) and ``ValueError`` for a case prepared with another
    spec; the caller records either as a failed model with the message.
    ``key_slices`` overrides the number of MMDLM key slices per role.
    ``floor``: tasks whose checkpoint's held-out metrics fall under it are left out
    (:func:`withhold_under_floor`); None checks nothing.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    ckpt = cache.get(selection.checkpoint, dev)
    family = ckpt.family
    prepared_for = case.meta.get("spec")
    if prepared_for is not None and prepared_for != validate_spec(ckpt.spec):
        raise ValueError(f"the case was prepared with another spec than {selection.checkpoint.path.name}'s; "
                         f"prepare it with this checkpoint's spec")
    batch = to_batch([case], ckpt.input_roles)
    kwargs: dict[str, Any] = {}
    params = inspect.signature(family.predict).parameters
    if "saliency" in params:
        kwargs["saliency"] = False  # Grad-CAM needs autograd; the report does not carry saliency maps
    if key_slices is not None and "key_slices" in params:
        kwargs["key_slices"] = int(key_slices)
    with _grad_mode(family.name):
        pred = family.predict(ckpt.model, batch, device=dev, autocast_dtype=_autocast_dtype(dev, autocast),
                              **kwargs)
    temps = temperatures_of(ckpt)
    tasks: list[TaskResult] = []
    for task, labels in pred.labels.items():
        raw = pred.probabilities[task][0].detach().float().cpu().numpy()
        temperature = temps.get(task)
        p = calibrate(raw, temperature) if temperature is not None else raw.astype(np.float64)
        names = tuple(labels)
        coding = TASKS.get(task, names)
        if names != tuple(coding):
            raise ValueError(f"{family.name}: labels of {task} are {names}, the node's coding is {coding}")
        probs = {name: float(p[i]) for i, name in enumerate(names)}
        threshold, source = operating_threshold(ckpt, task)
        tasks.append(TaskResult(task=task, label=label_at(names, p, threshold), probability=float(p[1]),
                                probabilities=probs, calibrated=temperature is not None, threshold=threshold,
                                threshold_source=source))
    tasks, floor_flags = withhold_under_floor(tasks, ckpt.metrics, list(family.tasks), floor)
    tasks, who_flags = who_consistent(tasks)
    keys, key_flags = _key_slices(case, pred.explanations, ckpt.input_roles, converted)
    info = selection.checkpoint
    result = ModelResult(
        family=family.name, paper=family.paper, checkpoint_name=info.path.name, checkpoint_sha256=ckpt.sha256,
        checkpoint_created=ckpt.created, input_roles=list(ckpt.input_roles), reason=selection.reason,
        tasks=tasks, key_slices=keys, training_data=dict(ckpt.training_data), metrics=dict(ckpt.metrics),
        device=str(dev), seconds=round(time.perf_counter() - t0, 4),
        quality_flags=[*case.meta.get("quality_flags", []), *floor_flags, *who_flags, *key_flags],
        measurements=case_measurements(case.meta),
    )
    log.info("%s (%s...) ran on %s in %.2f s", family.name, ckpt.sha256[:12], dev, result.seconds)
    return result


# --------------------------------------------------------------------------- the gate (features)


@dataclass(frozen=True)
class FeatureCheck:
    """The feature-space part of the gate for one case and checkpoint."""

    distance: float | None  # None: the checkpoint records no feature statistics, or the family has no features()
    threshold: float | None  # the checkpoint's threshold times gate_feature_factor
    finding: Any  # models.gate.GateFinding | None: None means the case passes


def check_case_features(selection: Selection, case: PreprocessedCase, cache: ModelCache, settings: GateSettings, *,
                        device: str | torch.device = "auto") -> FeatureCheck:
    """Before trusting a prediction: how far the case's penultimate features lie from the training features.

    Uses the family's
    ``features(model, batch, device)`` (fp32, no autocast: the statistics were
    taken in fp32) and the checkpoint's ``extra["gate"]["features"]``. A
    checkpoint without statistics, or a family without ``features``, gives
    the gate's "unchecked" finding unless ``settings.unchecked == "allow"``.
    Raises like :func:`run_model` for a refused checkpoint or a case prepared
    with another spec.
    """
    dev = resolve_device(device)
    ckpt = cache.get(selection.checkpoint, dev)
    prepared_for = case.meta.get("spec")
    if prepared_for is not None and prepared_for != validate_spec(ckpt.spec):
        raise ValueError(f"the case was prepared with another spec than {selection.checkpoint.path.name}'s")
    gate = (ckpt.extra or {}).get("gate")
    stats_data = (gate or {}).get("features")
    distance: float | None = None
    threshold: float | None = None
    if stats_data:
        stats = FeatureStats.from_dict(stats_data)
        threshold = float(stats.threshold) * float(settings.feature_factor)
        features = getattr(ckpt.family, "features", None)
        if features is not None:
            batch = to_batch([case], ckpt.input_roles)
            with torch.no_grad():
                f = features(ckpt.model, batch, device=dev)
            distance = float(stats.distance(f.detach().float().cpu().numpy().reshape(1, -1))[0])
    finding = check_features(gate, distance, settings)
    if distance is not None:
        log.info("%s (%s...): feature distance %.2f, threshold %.2f", ckpt.family.name, ckpt.sha256[:12],
                 distance, threshold)
    return FeatureCheck(distance=distance, threshold=threshold, finding=finding)


__all__ = ["FeatureCheck", "ModelCache", "OUTSIDE_SERIES_MM", "calibrate", "check_case_features",
           "floor_threshold_mismatch", "label_at", "operating_threshold", "resolve_device", "run_model",
           "temperatures_of", "who_consistent", "withhold_under_floor"]


# --------------------------------------------------------------------------- the infer stage


def model_cache(ctx: StageContext) -> ModelCache:
    """This process's loaded checkpoints (one per content hash), shared by every infer step."""
    return ctx.memo("model_cache", ModelCache)


def warm(ctx: StageContext) -> None:
    """Validate the checkpoints once when the worker starts (a bad file is reported now, not per study)."""
    registry(ctx)


def _input_series(ctx: StageContext, info: VersionInfo, converted: Mapping[str, ConvertedSeries]) -> list[InputSeries]:
    out = []
    for vi in ctx.index.version_inputs(info.version_id):
        if vi.status != "selected" or vi.role not in ROLES:
            continue
        c = converted.get(vi.role)
        out.append(InputSeries(
            role=vi.role, series_instance_uid=vi.series_instance_uid, series_number=vi.series_number,
            series_description=vi.series_description,
            instances=[SourceRef(vi.series_instance_uid, cls, uid) for _, cls, uid in vi.instances],
            example_file=str(ctx.settings.data_path / vi.instances[0][0]),
            converter=c.converter if c is not None else None, nifti=c.nifti if c is not None else None,
            files=[str(ctx.settings.data_path / p) for p, _, _ in vi.instances]))
    return out


def _source_example(ctx: StageContext, info: VersionInfo) -> str | None:
    """Any stored instance of the version: the header a cannot-grade report of an unreadable study copies."""
    files = ctx.index.version_files(info.study_id, info.version)
    return str(ctx.settings.data_path / files[0].path) if files else None


def _declined(run: PreparedRun, info_ck: CheckpointInfo, reasons: list[Any], stage: str,
              flags: list[str]) -> Declined:
    family = resolve_family(info_ck.family)
    return Declined(family=family.name, paper=family.paper, checkpoint_name=info_ck.path.name,
                    checkpoint_sha256=info_ck.sha256, input_roles=list(info_ck.input_roles), reasons=list(reasons),
                    stage=stage, measurements=dict(run.measurements), prepared_case=run.case,
                    quality_flags=list(flags), training_data=dict(info_ck.training_data))


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """Run each model the gate let through; the feature distance is checked before a prediction is trusted.

    Reads the convert and preprocess hand-offs. A declined model (measurements
    at preprocess, features here) produces a :class:`Declined` record and no
    grade. When no model grades, the cannot-grade sentence names every
    declined model with its findings.
    """
    wd = ctx.work_dir(info)
    plan = PreparedPlan.load(wd)
    converted = load_converted(ctx.nifti_dir(info))
    by_sha = {c.sha256: c for c in registry(ctx).checkpoints}
    gs, floor = gate_settings(ctx.settings), floor_settings(ctx.settings)
    cache = model_cache(ctx)
    results: list[ModelResult] = []
    declined: list[Declined] = []
    flags: list[str] = []
    gated = False  # did any model reach the gate (the SR then says whether it was loosened)
    for run_ in plan.runs:
        if run_.error or not run_.case:
            flags.append(f"{run_.family} did not run: preprocessing failed ({run_.error})")
            continue
        info_ck = by_sha.get(run_.sha256)
        if info_ck is None:
            flags.append(f"{run_.family} did not run: its checkpoint {run_.sha256[:12]} is no longer registered")
            continue
        gated = True
        if run_.gate:
            declined.append(_declined(run_, info_ck, run_.gate, "measurements", run_.flags))
            continue
        sel = Selection(info_ck, resolve_family(info_ck.family), run_.reason)
        try:
            case = load_case(Path(run_.case))
            check = check_case_features(sel, case, cache, gs, device=ctx.settings.device)
            if check.finding is not None:
                log.info("study %d version %d: %s declined by the gate (features)", info.study_id, info.version,
                         sel.family.name)
                declined.append(_declined(run_, info_ck, gate_reasons([check.finding]), "features",
                                          case.meta.get("quality_flags", [])))
                continue
            result = run_model(sel, case, converted, cache, device=ctx.settings.device, floor=floor)
        except Exception as exc:
            log.warning("study %d version %d: %s failed: %s", info.study_id, info.version, run_.family, exc)
            flags.append(f"{run_.family} did not run: inference failed ({type(exc).__name__}: {exc})")
            continue
        results.append(dataclasses.replace(result, prepared_case=run_.case, feature_distance=check.distance,
                                           feature_threshold=check.threshold))
    available = list(plan.available)
    conversion_errors = [f"{role} could not be converted: {c.error}" for role, c in converted.items() if c.error]
    cannot = None
    if not results:
        reasons = [d.sentence() for d in declined]
        reasons += [d.reason for d in plan.decisions if not d.runs] + conversion_errors + flags
        cannot = ("No model could grade this study. " + " ".join(reasons)).strip()
    loosened = (loosened_text(gs, floor) or plan.gate_loosened) if gated else None
    inputs = _input_series(ctx, info, converted)
    result = VersionResult(
        study_instance_uid=info.study_instance_uid, study_id=info.study_id, version=info.version,
        inputs=inputs, available_roles=available,
        missing_roles=[r for r in ROLES if r not in available], decisions=list(plan.decisions), results=results,
        cannot_grade=cannot,
        quality_flags=conversion_errors + flags + sorted({f for r in plan.runs for f in r.flags}),
        declined=declined, gate_loosened=loosened or None,
        source_example=None if inputs else _source_example(ctx, info),
    )
    result.save(wd / "result.json")
    return {"models": [r.family for r in results], "cannot_grade": cannot,
            "declined": {d.family: [r.reason for r in d.reasons] for d in declined},
            "findings": {r.family: {t.task: [t.label, round(t.probability, 4)] for t in r.tasks} for r in results}}
