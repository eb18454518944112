"""Converted volumes -> one model's input (its checkpoint's spec), with quality flags; a case on disk.

Why a thin layer over :func:`models.preprocess.apply_spec`: the preparation
itself belongs to the models (the checkpoint's spec, the same code training
ran), but the node must (1) turn a failure into a sentence for the report,
(2) say when an input is unlike the training data even though it can be
prepared, and (3) hand the prepared case to another process, possibly on
another host (preprocess on a CPU worker, inference on a GPU worker), so
:func:`save_case` / :func:`load_case` write and read it exactly.

Quality flags (strings, each one sentence, for the SR and ``status``):

- **not skull-stripped**: the models were trained on skull-stripped,
  BraTS-style volumes and find the brain as "nonzero voxels". Measured: a
  skull-stripped synthetic case (``training.cohort``) is nonzero in 29-35 %
  of its field of view (real BraTS: about 16 % of 240x240x155), an
  inscribed ellipsoid fills 52 % of its box, while a head with scalp, skull
  and scanner noise (``dicomnode.synth.make_phantom``, through DICOM and
  back) is nonzero in 100 % (its background noise is nonzero). Above
  ``max_mask_fraction`` (0.6) the "brain mask" is the whole head. Limit: the
  same head WITHOUT noise is 33 % (brain only: 21 %), so a head whose
  background the scanner set to 0 is not caught by this share alone.
- **few slices**: fewer than ``min_slices`` along a volume's shortest axis.
- **non-finite voxels**: NaN/inf in a converted volume (set to 0 by the spec).
- **brain cut**: the brain extends beyond the model's fixed field of view.
- **short slice bag** (slice models): fewer brain slices than the model's bag size.
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dicomnode.handoff import Decision, GateReason, PreparedPlan, PreparedRun, load_converted
from dicomnode.index.studies import VersionInfo
from dicomnode.stages.context import StageContext
from dicomnode.stages.models import floor_settings, gate_settings, loosened_text, registry
from models.casefile import CASE_FORMAT, load_case, plain, save_case
from models.clinical import DirCache
from models.gate import GateFinding, case_measurements, check_floor, check_measurements
from models.preprocess import PreprocessedCase, PreprocessError, SpecError, apply_spec, validate_spec
from models.vocab import ROLES

log = logging.getLogger(__name__)


class PrepareError(ValueError):
    """A case that cannot be prepared for a model; ``reason`` is one sentence for the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class QualityThresholds:
    """When an input is flagged as unlike the training data (see the module docstring for the measurements)."""

    max_mask_fraction: float = 0.6
    min_slices: int = 20


def _mask_threshold(spec: Mapping[str, Any]) -> float | None:
    for t in spec["transforms"]:
        if t["name"] == "brain_mask":
            return float(t["threshold"])
    return None


def _source_measures(spec: Mapping[str, Any], niftis: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """Per role of the spec: shape, voxel size, nonzero share of the field of view (cheap, from the headers + data)."""
    threshold = _mask_threshold(spec)
    out: dict[str, dict[str, Any]] = {}
    for role in spec["roles"]:
        img = nib.load(os.fspath(niftis[role]))
        data = np.asarray(img.dataobj, dtype=np.float32)
        finite = np.isfinite(data)
        entry: dict[str, Any] = {"shape": [int(n) for n in img.shape[:3]],
                                 "zooms": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
                                 "nonfinite_voxels": int(data.size - int(finite.sum()))}
        if threshold is not None:
            entry["mask_fraction"] = round(float((np.abs(np.where(finite, data, 0.0)) > threshold).mean()), 4)
        out[role] = entry
    return out


def _whole_head(spec: Mapping[str, Any], measures: Mapping[str, Mapping[str, Any]],
                thresholds: QualityThresholds) -> dict[str, float]:
    """Roles whose nonzero share says "whole head", for a spec that takes nonzero voxels as the brain.

    One rule for the quality flag and the gate finding: a clinical spec extracts the
    brain, so a whole head is what it expects and nothing is returned for it.
    """
    if not _nonzero_mask(spec):
        return {}
    return {r: float(m["mask_fraction"]) for r, m in measures.items()
            if "mask_fraction" in m and float(m["mask_fraction"]) > thresholds.max_mask_fraction}


def _brain_cut(case: PreprocessedCase) -> bool:
    return any(step.get("name") == "crop_or_pad" and step.get("brain_truncated") for step in case.meta.get("steps", []))


def quality_flags(spec: Mapping[str, Any], case: PreprocessedCase, measures: Mapping[str, Mapping[str, Any]],
                  thresholds: QualityThresholds = QualityThresholds()) -> list[str]:
    """The flags for one prepared case: one sentence each, in a stable order."""
    flags: list[str] = []
    big = _whole_head(spec, measures, thresholds)
    if big:
        share = ", ".join(f"{r} {f:.0%}" for r, f in big.items())
        flags.append(f"input does not look skull-stripped; the brain mask is the whole head (nonzero share of the "
                     f"field of view: {share}; skull-stripped training data: under "
                     f"{thresholds.max_mask_fraction:.0%}): the models were trained on skull-stripped volumes")
    few = {r: min(m["shape"]) for r, m in measures.items() if min(m["shape"]) < thresholds.min_slices}
    if few:
        flags.append("very few slices: " + ", ".join(f"{r} has {n}" for r, n in few.items())
                     + f" (fewer than {thresholds.min_slices})")
    bad = {r: m["nonfinite_voxels"] for r, m in measures.items() if m.get("nonfinite_voxels")}
    if bad:
        flags.append("non-finite voxels (NaN/inf, set to 0): " + ", ".join(f"{r} {n}" for r, n in bad.items()))
    if _brain_cut(case):
        flags.append("the brain extends beyond the model's field of view and was cut")
    sl = case.meta.get("slices")
    if sl and int(sl.get("real", 0)) < int(sl.get("count", 0)):
        flags.append(f"only {sl['real']} brain slices for a bag of {sl['count']} (the rest is padding)")
    return flags


def prepare(spec: Mapping[str, Any], niftis: Mapping[str, Path], *,
            thresholds: QualityThresholds = QualityThresholds(),
            cache: MutableMapping[str, Any] | None = None) -> PreprocessedCase:
    """Apply ``spec`` to the converted volumes (role -> NIfTI path); raise :class:`PrepareError` with a reason.

    ``meta`` gains ``spec`` (validated: inference checks the case was prepared
    for its checkpoint), ``quality`` (the per-role measurements) and
    ``quality_flags``; all of ``meta`` is plain JSON data.
    """
    try:
        clean = validate_spec(spec)
    except SpecError as exc:
        raise PrepareError(f"the checkpoint's preprocessing spec is invalid: {exc}") from exc
    missing = [r for r in clean["roles"] if r not in niftis]
    if missing:
        raise PrepareError(f"missing {', '.join(missing)}: the model needs {'+'.join(clean['roles'])}")
    try:
        measures = _source_measures(clean, niftis)
        case = apply_spec(clean, {r: Path(niftis[r]) for r in clean["roles"]}, cache=cache)
    except PreprocessError as exc:
        raise PrepareError(f"the volumes cannot be prepared as the model expects: {exc}") from exc
    except (OSError, nib.filebasedimages.ImageFileError, EOFError, zipfile.BadZipFile) as exc:
        raise PrepareError(f"a converted volume cannot be read: {type(exc).__name__}: {exc}") from exc
    meta = dict(case.meta)
    meta["spec"] = clean
    meta["quality"] = measures
    case.meta = plain(meta)
    case.meta["quality_flags"] = quality_flags(clean, case, measures, thresholds)
    return case


# --------------------------------------------------------------------------- the gate (measurements)

# Transforms that make a spec "clinical": it finds the brain itself (brain extraction, atlas space),
# so it can be handed a whole head. A spec without them finds the brain as "nonzero voxels".
CLINICAL_TRANSFORMS: frozenset[str] = frozenset({"brain_extract", "atlas_register"})


def is_clinical(spec: Mapping[str, Any]) -> bool:
    """Whether ``spec`` prepares whole heads itself (brain extraction / atlas registration)."""
    return any(t.get("name") in CLINICAL_TRANSFORMS for t in spec.get("transforms", []))


def _nonzero_mask(spec: Mapping[str, Any]) -> bool:
    return any(t.get("name") == "brain_mask" and t.get("method", "nonzero") == "nonzero"
               for t in spec.get("transforms", []))


def quality_findings(spec: Mapping[str, Any], case: PreprocessedCase, settings: Any,
                     thresholds: QualityThresholds = QualityThresholds()) -> list[Any]:
    """Quality checks that say the input is unlike the training data, as gate findings.

    - **not skull-stripped** (a spec whose brain mask is "nonzero voxels"): the
      model would read the whole head as brain. For a spec without clinical
      transforms the training data were skull-stripped by definition, but the
      checkpoint records nothing to compare with: an *unchecked* finding, which
      only ``gate_unchecked = "allow"`` lets through. For a clinical spec that
      still masks by nonzero voxels it always declines.
    - **brain cut**: the brain extends beyond the model's fixed field of view.
    ``settings`` is a :class:`models.gate.GateSettings`.
    """

    out: list[Any] = []
    big = _whole_head(spec, case.meta.get("quality") or {}, thresholds)
    if big and (is_clinical(spec) or settings.unchecked != "allow"):
        share = ", ".join(f"{r} {f:.0%}" for r, f in big.items())
        out.append(GateFinding(
            name="nonzero_share", value=max(big.values()), unit="1", low=None, high=thresholds.max_mask_fraction,
            reason=f"input does not look skull-stripped (nonzero share of the field of view: {share}); this "
                   f"model finds the brain as nonzero voxels and was trained on skull-stripped volumes "
                   f"(under {thresholds.max_mask_fraction:.0%})"))
    if _brain_cut(case):
        out.append(GateFinding(name="brain_cut", value=None, unit="1", low=None, high=None,
                               reason="the brain extends beyond the model's field of view and would be cut"))
    return out


def gate_case(gate: Mapping[str, Any] | None, spec: Mapping[str, Any], case: PreprocessedCase, settings: Any,
              thresholds: QualityThresholds = QualityThresholds()) -> list[Any]:
    """Every reason the gate gives, before inference, for a model not to grade this prepared case.

    ``gate`` is the checkpoint's ``extra["gate"]`` (None for checkpoints made
    before the gate), ``settings`` a :class:`models.gate.GateSettings`. The
    measurements are :func:`models.gate.case_measurements` of the case (the
    clinical transforms' plus the source geometry), compared with the
    checkpoint's training ranges; then :func:`quality_findings`. Empty: the
    model may go on to inference (where the feature distance is checked).
    """

    findings = list(check_measurements(gate, case_measurements(case.meta), settings))
    return findings + quality_findings(spec, case, settings, thresholds)


__all__ = ["CASE_FORMAT", "CLINICAL_TRANSFORMS", "PrepareError", "QualityThresholds", "gate_case", "is_clinical",
           "load_case", "prepare", "quality_findings", "quality_flags", "save_case"]


def gate_reasons(findings: Any) -> list[GateReason]:
    """Gate findings (``models.gate.GateFinding``) as the hand-off's plain records."""
    return [GateReason(name=f.name, value=f.value, unit=f.unit, low=f.low, high=f.high, reason=f.reason)
            for f in findings]


def run(ctx: StageContext, info: VersionInfo) -> dict[str, Any]:
    """Prepare the case for each selected checkpoint (its own spec) and check its measurements (the gate).

    Reads the convert stage's hand-off (never converts). A model whose case
    falls outside its checkpoint's training ranges (or fails a quality check
    that says the input is unlike its training data), or whose held-out grade
    metrics fall under the node's floor, is declined in the plan with the
    findings; the case is still saved, so the summary image can show what the
    model would have seen.
    """
    converted = load_converted(ctx.nifti_dir(info))
    available = [r for r in ROLES if r in converted and converted[r].nifti is not None]
    gs, floor = gate_settings(ctx.settings), floor_settings(ctx.settings)
    reg = registry(ctx)
    prep_dir = ctx.work_dir(info) / "prep"
    prep_dir.mkdir(exist_ok=True)
    # one memo per study version: several checkpoints' specs (and a redelivered step) pay for
    # bias fields, registrations and the brain mask once
    memo = DirCache(ctx.work_dir(info) / "prep-memo")
    runs: list[PreparedRun] = []
    for sel in reg.select(available):
        ck = sel.checkpoint
        try:
            case = prepare(ck.spec, {r: Path(converted[r].nifti or "") for r in ck.input_roles}, cache=memo)
            path = prep_dir / f"{ck.sha256[:16]}.npz"
            save_case(case, path)
            reasons = gate_reasons(gate_case((ck.extra or {}).get("gate"), ck.spec, case, gs))
            # the floor: a model whose GRADE the checkpoint's held-out metrics do not support is declined
            # (with every task's reasons); a weaker IDH or 1p/19q alone is withheld at inference
            under = check_floor(ck.metrics, list(sel.family.tasks), floor)
            if "grade" in under:
                reasons += gate_reasons([f for fs in under.values() for f in fs])
            if reasons:
                log.info("study %d version %d: %s declined by the gate (%d finding(s))", info.study_id,
                         info.version, sel.family.name, len(reasons))
            runs.append(PreparedRun(family=sel.family.name, sha256=ck.sha256, reason=sel.reason, case=str(path),
                                    error=None, flags=list(case.meta.get("quality_flags", [])),
                                    measurements=case_measurements(case.meta), gate=reasons))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning("study %d version %d: preprocessing for %s failed: %s", info.study_id, info.version,
                        sel.family.name, error)
            runs.append(PreparedRun(family=sel.family.name, sha256=ck.sha256, reason=sel.reason, case=None,
                                    error=error))
    plan = PreparedPlan(available=available, runs=runs, gate_loosened=loosened_text(gs, floor),
                        decisions=[Decision(d.family, d.runs, d.reason) for d in reg.explain(available)])
    plan.save(ctx.work_dir(info))
    return {"available": available, "models": [r.family for r in runs if r.case and not r.gate],
            "declined": {r.family: [g.reason for g in r.gate] for r in runs if r.gate},
            "errors": {r.family: r.error for r in runs if r.error}}
