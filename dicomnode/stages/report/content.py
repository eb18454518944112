"""Building blocks of the glioma report: one TID 1501 group per (model, task), and the version's notes.

Kept apart from :mod:`dicomnode.stages.report.sop` as highdicom keeps ``content.py``
apart from ``sop.py``: these functions know what a model said and how to say
it in SR content items; ``sop`` knows how to wrap that into a DICOM object in
the right study. Every function is pure (same input, same items), because the
report's UIDs are deterministic and a re-run must produce the same document.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    ContainerContentItem,
    FindingSite,
    Measurement,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.uid import generate_uid

from dicomnode.handoff import FAMILY_TITLES, Declined, KeySlice, ModelResult, TaskResult, VersionResult, family_title

from dicomnode.stages.report import codes as c

DISCLAIMER_TEXT = (
    "Research use only. Not for diagnostic use. This report was produced automatically by a machine-learning "
    "model that has not been cleared or approved as a medical device; it must not be used for diagnosis, "
    "treatment or any clinical decision. Probabilities are model outputs, not clinical certainty."
)

NODE_ALGORITHM_NAME = "dicomnode glioma grading"
_TASK_TITLE = {"grade": "grade", "idh": "IDH", "1p19q": "1p/19q"}


# The SR is written in ISO_IR 100 (Latin-1, the character set of its source study's header): typography
# outside it (the gate's "1.0–1.0 mm") would be stored as "?".
_LATIN1 = str.maketrans({"\u2013": "-", "\u2014": "-", "\u2212": "-", "\u2018": "'", "\u2019": "'",
                         "\u201c": '"', "\u201d": '"', "\u2026": "..."})


def latin1(text: str) -> str:
    """``text`` with common typography mapped to Latin-1, anything else outside it as "?"."""
    return text.translate(_LATIN1).encode("latin-1", "replace").decode("latin-1")


def text_item(code: c.VerifiedCode, value: str) -> TextContentItem:
    """A CONTAINS TEXT item; empty text is replaced because UT values of SR TEXT items must not be empty."""
    return TextContentItem(name=code.concept, value=latin1(value).strip() or "(none)",
                           relationship_type=RelationshipTypeValues.CONTAINS)


def derived_uid(*parts: object) -> str:
    """A UID from its parts: tracking UIDs must be as reproducible as the report's own UIDs."""
    return generate_uid(entropy_srcs=["dicomnode.stages.report", *(str(p) for p in parts)])


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"auc": {"grade": 0.9}}`` -> ``["auc.grade: 0.9"]``: nested checkpoint dicts as readable lines."""
    lines: list[str] = []
    for key in sorted(data, key=str):
        value = data[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            lines.extend(flatten(value, name + "."))
        elif isinstance(value, float):
            lines.append(f"{name}: {value:.4g}")
        elif isinstance(value, (list, tuple)):
            lines.append(f"{name}: {', '.join(str(v) for v in value)}")
        else:
            lines.append(f"{name}: {value}")
    return lines


# --------------------------------------------------------------------------- words a person reads

# a family's code name as a word of a sentence ("mmdlm runs on ..."), not inside a file name or a path
# ("mmdlm-holdout-r0.pt", "/ckpt/mmdlm/"): only the former is a name a reader should not have to decode
_FAMILY_WORD = re.compile(r"(?<![\w./-])("
                          + "|".join(re.escape(f) for f in sorted(FAMILY_TITLES, key=len, reverse=True))
                          + r")(?![\w/-]|\.\w)")


def plain_names(text: str) -> str:
    """``text`` with every model family's code name replaced by the name a clinician knows it by.

    The registry and the gate write their sentences with code names ("mmdlm
    runs on T1CE+T2+FLAIR"); a reader of the summary, the SR's text or the
    terminal report should read "MMDLM runs on ...", "Full-sequence 3D CNN
    ...". File names keep their code names (they are identifiers).
    """
    return _FAMILY_WORD.sub(lambda m: family_title(m.group(1)), text)


def short_reason(reason: str) -> str:
    """A registry reason without its checkpoint-selection clause ("; using <file>, the newest of ...").

    The checkpoint is named beside the model on every view; the clause
    (with its microsecond timestamp) is what pushed the decisions off the
    summary page. The SR keeps the whole sentence.
    """
    return re.sub(r";\s*using \S+(?:,.*)?$", ".", reason.strip()).rstrip(".") + "."


SYNTHETIC_WARNING = "Trained on SYNTHETIC data \u2014 not for clinical use"
_SYNTHETIC = re.compile(r"\bsynthetic\b", re.IGNORECASE)


def trained_on_synthetic(training_data: Mapping[str, Any]) -> bool:
    """Whether a checkpoint says it was trained on synthetic data (its description, or ``synthetic: true``).

    ``training.export`` stores the site's (or the demo's) words as
    ``training_data["description"]``; the demo's say "synthetic demo cohort
    ..., NOT for clinical use". A checkpoint with no description is not
    called synthetic (nothing says so); the views say "not described".
    """
    if training_data.get("synthetic") is True:
        return True
    return bool(_SYNTHETIC.search(str(training_data.get("description") or "")))


def synthetic_models(result: VersionResult) -> list[str]:
    """Plain names of the models (graded, then declined) whose checkpoints say they were trained on synthetic data."""
    records: list[ModelResult | Declined] = [*result.results, *result.declined]
    names = [family_title(r.family) for r in records if trained_on_synthetic(r.training_data)]
    return list(dict.fromkeys(names))


def synthetic_warning(result: VersionResult) -> str | None:
    """The warning every view puts near its top when a checkpoint was trained on synthetic data, else None.

    Names the models only when some, not all, of them are synthetic: then
    the reader must know which answers the warning is about.
    """
    names = synthetic_models(result)
    if not names:
        return None
    every = {family_title(r.family) for r in [*result.results, *result.declined]}
    return SYNTHETIC_WARNING + ("" if set(names) == every else f": {', '.join(names)}")


def training_summary(training_data: Mapping[str, Any]) -> str:
    """What a model was trained on, in one short phrase: the checkpoint's description and the case count."""
    desc = str(training_data.get("description") or "").strip() or "training data not described by the checkpoint"
    train = training_data.get("train")
    n = train.get("n_cases") if isinstance(train, Mapping) else None
    return desc + (f" ({n} training cases)" if isinstance(n, int) and not isinstance(n, bool) else "")


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def _interval(m: Mapping[str, Any], key: str) -> tuple[float, float, float] | None:
    """(low, high, level) of a stored confidence interval of ``key``, in the shapes training may store it.

    ``<key>_ci`` as ``training.metrics.BootstrapCI`` fields (low, high, level) or a [low, high] pair,
    or ``ci: {<key>: ...}``. None when no finite interval is stored (today's checkpoints store none).
    """
    ci = m.get("ci")
    for v in (m.get(f"{key}_ci"), ci.get(key) if isinstance(ci, Mapping) else None):
        if isinstance(v, Mapping):
            low, high, level = _number(v.get("low")), _number(v.get("high")), _number(v.get("level")) or 0.95
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            low, high, level = _number(v[0]), _number(v[1]), 0.95
        else:
            continue
        if low is not None and high is not None:
            return low, high, level
    return None


def figures_text(m: Mapping[str, Any], *, n: Any = None, accuracy: bool = False) -> str:
    """One evaluation's figures as a reader scans them: "AUC 0.91 (95% CI 0.84–0.97), sens 0.86, spec 0.81, n=74"."""
    parts: list[str] = []
    auc = _number(m.get("auc"))
    if auc is not None:
        ci = _interval(m, "auc")
        parts.append(f"AUC {auc:.2f}" + (f" ({ci[2]:.0%} CI {ci[0]:.2f}\u2013{ci[1]:.2f})" if ci else ""))
    elif "auc" in m:
        parts.append("AUC undefined")
    for key, label in (("sensitivity", "sens"), ("specificity", "spec")) + ((("accuracy", "acc"),) if accuracy else ()):
        v = _number(m.get(key))
        if v is not None:
            parts.append(f"{label} {v:.2f}")
    count = m.get("n", n)
    if isinstance(count, int) and not isinstance(count, bool):
        parts.append(f"n={count}")
    return ", ".join(parts)


def _task_figures(part: Any, task: str, single: bool) -> Mapping[str, Any] | None:
    """One task's metrics in a checkpoint's ``metrics[part]``: per task (MMDLM) or flat (single-task models)."""
    if not isinstance(part, Mapping):
        return None
    if isinstance(part.get(task), Mapping):
        return part[task]
    if single and any(k in part for k in ("auc", "sensitivity", "specificity")):
        return part
    return None


def heldout_line(metrics: Mapping[str, Any], tasks: Sequence[str]) -> str:
    """The model's held-out (test part) performance in one line, from the figures its checkpoint stores.

    Single task: "held-out: AUC 0.91, sens 0.86, spec 0.81, n=74"; several
    (MMDLM): "held-out: grade AUC 0.88, ..., n=20; IDH AUC 0.74, n=18".
    The held-out part is the one no training or model selection looked at;
    validation figures (used to select the model) are in the SR, not here.
    """
    tasks = list(tasks) or ["grade"]
    single = len(tasks) == 1
    n = metrics.get("n_test")
    parts = []
    for task in tasks:
        m = _task_figures(metrics.get("test"), task, single)
        text = figures_text(m, n=n if single else None) if m is not None else ""
        if text:
            parts.append(text if single else f"{_TASK_TITLE.get(task, task)} {text}")
    return "held-out: " + ("; ".join(parts) if parts else "not recorded in the checkpoint")


def training_text(training_data: Mapping[str, Any], task: str) -> str:
    """One sentence a clinician can read: what the model learned from (the checkpoint holds the rest)."""
    parts = [str(training_data.get("description") or "not described")]
    for part in ("train", "val"):
        d = training_data.get(part)
        if not isinstance(d, Mapping) or "n_cases" not in d:
            continue
        labels = d.get("labels", {}).get(task) if isinstance(d.get("labels"), Mapping) else None
        counts = ""
        if isinstance(labels, Mapping):
            counts = " (" + ", ".join(f"{k} {v}" for k, v in labels.items() if k != "missing" and v) + ")"
        parts.append(f"{'training' if part == 'train' else 'validation'}: {d['n_cases']} cases{counts}")
    if training_data.get("protocol"):
        # the training run's identifiers, quoted: a protocol is named like a family ("promptnet" trains the 3D CNN too)
        parts.append(f"training protocol '{training_data['protocol']}'"
                     + (f", row '{training_data['row']}'" if training_data.get("row") else ""))
    return "; ".join(parts)


def metrics_text(metrics: Mapping[str, Any], task: str) -> str:
    """The checkpoint's held-out and validation figures for this task (AUC first), or a short fallback.

    "held-out test: AUC 0.91, sens 0.90, spec 0.80, acc 0.86, n=74; validation: AUC 0.88, n=20".
    """
    out = []
    for part, name in (("test", "held-out test"), ("val", "validation")):
        m = metrics.get(part)
        if isinstance(m, Mapping) and isinstance(m.get(task), Mapping):
            m = m[task]
        if not isinstance(m, Mapping) or "auc" not in m:
            continue
        out.append(f"{name}: " + figures_text(m, n=metrics.get("n_test") if part == "test" else None, accuracy=True))
    if out:
        return "; ".join(out)
    aucs = [line for line in flatten(metrics) if "auc" in line.split(":")[0]]
    return "; ".join(aucs[:6]) or "not recorded"


def probabilities_text(task: TaskResult) -> str:
    """All class probabilities in the task's own class order, so the numeric item is never read alone."""
    parts = [f"P({label}) = {p:.3f}" for label, p in task.probabilities.items()]
    return ", ".join(parts) + (" (calibrated)" if task.calibrated else " (uncalibrated)")


def threshold_text(task: TaskResult) -> str:
    """The rule that turned the probability into the finding, in one line a reader can check against P.

    "HGG when P(HGG) >= 0.62, else LGG (operating threshold chosen on validation data)". Why
    said at all: with a threshold other than 0.5, P(HGG) = 0.55 can read LGG, which looks like
    an error unless the report says where the cut lies and where it came from.
    """
    names = list(task.probabilities)
    positive = names[1] if len(names) == 2 else task.label
    negative = names[0] if len(names) == 2 else "the other class"
    calibrated = "calibrated " if task.calibrated else ""
    if task.threshold_source == "validation":
        origin = "operating threshold chosen on validation data"
    else:
        origin = "default threshold: the checkpoint stores none chosen on validation data"
    return f"{positive} when {calibrated}P({positive}) >= {task.threshold:.3f}, else {negative} ({origin})"


def threshold_line(task: TaskResult) -> str:
    """The summary image's line under a task's result: P(positive) against the operating threshold.

    "P(HGG) = 0.29 >= threshold 0.25 (validation); calibrated": why the label is what it is, in
    one line short enough for the image's narrow text column (the SR's :func:`threshold_text`
    says it in full). It replaces the list of both class probabilities: for a binary task the
    result line above already gives P of the label, and this line gives P(positive).
    """
    calibration = "calibrated" if task.calibrated else "not calibrated"
    names = list(task.probabilities)
    if len(names) != 2:
        probs = ", ".join(f"P({k}) = {v:.2f}" for k, v in task.probabilities.items())
        return f"{probs}; {calibration}"
    positive = names[1]
    compare = ">=" if task.label == positive else "<"
    origin = "validation" if task.threshold_source == "validation" else "default"
    return (f"P({positive}) = {task.probabilities[positive]:.2f} {compare} threshold {task.threshold:.2f} "
            f"({origin}); {calibration}")


def inputs_text(result: VersionResult, roles: Iterable[str] | None = None) -> str:
    """Which source series fed the model(s), by role and series number (no patient data)."""
    wanted = set(roles) if roles is not None else None
    lines = []
    for s in result.inputs:
        if wanted is not None and s.role not in wanted:
            continue
        desc = f", '{s.series_description}'" if s.series_description else ""
        num = f"series {s.series_number}" if s.series_number is not None else "series"
        lines.append(f"{s.role}: {num}{desc}, {len(s.instances)} instance(s), UID {s.series_instance_uid}")
    return "; ".join(lines) or "none"


def missing_text(result: VersionResult) -> str:
    return ", ".join(result.missing_roles) if result.missing_roles else "none (T1, T1CE, T2 and FLAIR all present)"


def algorithm_id(model: ModelResult, algorithm_version: str, manufacturer: str) -> AlgorithmIdentification:
    """TID 4019: the model is the algorithm; its checkpoint hash is part of its version, as the design asks."""
    version = f"{algorithm_version}; checkpoint {model.checkpoint_name} sha256:{model.checkpoint_sha256}"
    params = [
        f"family={model.family}",
        f"paper={model.paper}",
        f"checkpoint={model.checkpoint_name}",
        f"checkpoint_sha256={model.checkpoint_sha256}",
        f"checkpoint_created={model.checkpoint_created}",
        f"input_roles={'+'.join(model.input_roles)}",
        f"device={model.device}",
    ]
    return AlgorithmIdentification(name=f"{NODE_ALGORITHM_NAME}: {model.family}", version=version,
                                   parameters=params, manufacturer=manufacturer)


def node_algorithm_id(algorithm_version: str, manufacturer: str) -> AlgorithmIdentification:
    """The node itself as the algorithm, for a report in which no model ran."""
    return AlgorithmIdentification(name=NODE_ALGORITHM_NAME, version=algorithm_version,
                                   parameters=["no model ran"], manufacturer=manufacturer)


def key_slice_images(key_slices: Sequence[KeySlice]) -> list[SourceImageForMeasurementGroup]:
    """TID 1501 "Source" image references for the slices the model attended to most (ordered by attention)."""
    out: list[SourceImageForMeasurementGroup] = []
    seen: set[tuple[str, int | None]] = set()
    for k in sorted(key_slices, key=lambda k: (-k.attention, k.role, k.ref.sop_instance_uid, k.ref.frame or 0)):
        key = (k.ref.sop_instance_uid, k.ref.frame)
        if key in seen:
            continue
        seen.add(key)
        out.append(SourceImageForMeasurementGroup(
            referenced_sop_class_uid=k.ref.sop_class_uid,
            referenced_sop_instance_uid=k.ref.sop_instance_uid,
            referenced_frame_numbers=[k.ref.frame] if k.ref.frame is not None else None,
        ))
    return out


def key_slice_text(k: KeySlice) -> str:
    frame = f", frame {k.ref.frame}" if k.ref.frame is not None else ""
    return (f"{k.role}: attention {k.attention:.3f}; image {k.ref.sop_instance_uid}{frame} "
            f"(series {k.ref.series_instance_uid})")


def _check_probability(model: ModelResult, task: TaskResult) -> float:
    """The probability of the predicted class; a model that returns nonsense must not produce an SR."""
    if task.label not in task.probabilities:
        raise ValueError(f"{model.family}/{task.task}: label {task.label!r} not among {sorted(task.probabilities)}")
    p = float(task.probabilities[task.label])
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"{model.family}/{task.task}: probability {p!r} outside [0, 1]")
    if task.task not in c.TASK_CONCEPT or task.label not in c.CLASS_CODE:
        raise ValueError(f"{model.family}/{task.task}: no code for task {task.task!r} / label {task.label!r}")
    return p


def task_group(model: ModelResult, task: TaskResult, result: VersionResult, *, report_uid: str,
               algorithm_version: str, manufacturer: str, first: bool = True) -> MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: Finding = predicted class, Probability = P(that class), the rest as TEXT.

    One group per (model, task) rather than per model, because TID 300's
    Probability has no slot saying which class it is about: inside a group
    whose Finding is the predicted class, "Probability" can only mean the
    probability of that finding. The key slices belong to the model, not to
    a task: every group references them as IMAGE sources (the evidence of
    its finding), but their TEXT lines (role, attention, image) are written
    once, in the model's ``first`` group, not once per task.
    """
    p = _check_probability(model, task)
    finding = c.CLASS_CODE[task.label].concept
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(report_uid, model.family, model.checkpoint_sha256, task.task),
            identifier=f"{model.family} {_TASK_TITLE.get(task.task, task.task)}",
        ),
        finding_type=finding,
        algorithm_id=algorithm_id(model, algorithm_version, manufacturer),
        finding_sites=[FindingSite(anatomic_location=c.BRAIN.concept)],
        measurements=[Measurement(name=c.PROBABILITY.concept, value=round(p, 6), unit=c.UNIT_ONE.concept)],
        qualitative_evaluations=[QualitativeEvaluation(name=c.TASK_CONCEPT[task.task].concept, value=finding)],
        source_images=key_slice_images(model.key_slices) or None,
    )
    items = [
        text_item(c.CLASS_PROBABILITIES, probabilities_text(task)),
        text_item(c.OPERATING_THRESHOLD, threshold_text(task)),
        text_item(c.MODEL_PATH, plain_names(model.reason)),
        text_item(c.INPUTS_USED, inputs_text(result, model.input_roles)),
        text_item(c.MISSING_INPUTS, missing_text(result)),
    ]
    if first:
        items += [text_item(c.KEY_SLICE, key_slice_text(k))
                  for k in sorted(model.key_slices, key=lambda k: (-k.attention, k.role, k.ref.sop_instance_uid))]
    items.append(text_item(c.TRAINING_DATA, training_text(model.training_data, task.task)))
    items.append(text_item(c.VALIDATION_METRICS, metrics_text(model.metrics, task.task)))
    items += [text_item(c.QUALITY_FLAG, flag) for flag in model.quality_flags]
    if result.gate_loosened:
        items.append(text_item(c.GATE_LOOSENED, result.gate_loosened))
    group[0].ContentSequence.extend(items)
    return group


# --------------------------------------------------------------------------- measurements and the gate


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def measurement_items(values: Mapping[str, Any]) -> tuple[list[Measurement], list[str]]:
    """NUM items (99DCMNODE concept, UCUM unit) for the measurements with a code and a finite value.

    Returns the items and, for the rest, a line each ("name: value") so
    nothing measured is silently dropped from the report.
    """
    nums: list[Measurement] = []
    rest: list[str] = []
    for name in sorted(values):
        value = values[name]
        code = c.measurement_code(name)
        if code is None or not _finite(value):
            rest.append(f"{name}: {value}")
            continue
        nums.append(Measurement(name=code.concept, value=round(float(value), 4),
                                unit=c.measurement_unit(name).concept))
    return nums, rest


def _model_values(model: ModelResult) -> dict[str, Any]:
    values: dict[str, Any] = dict(model.measurements)
    if model.feature_distance is not None:
        values["feature_distance"] = model.feature_distance
    return values


def measurements_group(model: ModelResult, result: VersionResult, *, report_uid: str, algorithm_version: str,
                       manufacturer: str) -> MeasurementsAndQualitativeEvaluations | None:
    """One TID 1501 group per graded model: the measurements of the case it graded (no Finding).

    Kept apart from the finding groups: inside a group whose Finding is "High
    grade glioma", "brain volume" would read as a measurement of the tumour.
    None when the model carries no measurements (checkpoints and results from
    before the gate).
    """
    values = _model_values(model)
    if not values:
        return None
    nums, rest = measurement_items(values)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(report_uid, model.family, model.checkpoint_sha256, "input"),
            identifier=f"{model.family} input measurements"),
        algorithm_id=algorithm_id(model, algorithm_version, manufacturer),
        finding_sites=[FindingSite(anatomic_location=c.BRAIN.concept)],
        measurements=nums or None,
    )
    items = [text_item(c.QUALITY_FLAG, f"measurement without a coded concept: {line}") for line in rest]
    if model.feature_distance is not None and model.feature_threshold is not None:
        items.append(text_item(c.GATE_FINDING, (
            f"image-feature distance from the training data {model.feature_distance:.2f} "
            f"(threshold {model.feature_threshold:.2f}): within range")))
    if result.gate_loosened:
        items.append(text_item(c.GATE_LOOSENED, result.gate_loosened))
    if items:
        group[0].ContentSequence.extend(items)
    return group


def declined_algorithm_id(d: Declined, algorithm_version: str, manufacturer: str) -> AlgorithmIdentification:
    version = f"{algorithm_version}; checkpoint {d.checkpoint_name} sha256:{d.checkpoint_sha256}"
    params = [f"family={d.family}", f"paper={d.paper}", f"checkpoint={d.checkpoint_name}",
              f"checkpoint_sha256={d.checkpoint_sha256}", f"input_roles={'+'.join(d.input_roles)}",
              f"declined by the input gate ({d.stage})"]
    return AlgorithmIdentification(name=f"{NODE_ALGORITHM_NAME}: {d.family}", version=version,
                                   parameters=params, manufacturer=manufacturer)


def declined_text(d: Declined) -> str:
    return f"{family_title(d.family)} did not grade this study: " + "; ".join(
        plain_names(r.reason).rstrip(".") for r in d.reasons) + "."


def declined_group(d: Declined, result: VersionResult, *, report_uid: str, algorithm_version: str,
                   manufacturer: str) -> MeasurementsAndQualitativeEvaluations:
    """A group for a model the gate declined: NO Finding, NO Probability; each reason as TEXT, the values as NUM.

    The NUMs are the case's measurements plus the gate's own numbers behind a
    reason (feature distance, nonzero share), so a reader sees the value the
    range in the reason was compared with.
    """
    values: dict[str, Any] = dict(d.measurements)
    for r in d.reasons:
        if _finite(r.value) and c.measurement_code(r.name) is not None:
            values[r.name] = r.value
    nums, rest = measurement_items(values)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(report_uid, d.family, d.checkpoint_sha256, "declined"),
                                               identifier=f"{d.family} declined"),
        algorithm_id=declined_algorithm_id(d, algorithm_version, manufacturer),
        finding_sites=[FindingSite(anatomic_location=c.BRAIN.concept)],
        measurements=nums or None,
    )
    items = [text_item(c.DECLINED, declined_text(d))]
    items += [text_item(c.GATE_FINDING, r.reason) for r in d.reasons]
    items.append(text_item(c.INPUTS_USED, inputs_text(result, d.input_roles)))
    items += [text_item(c.QUALITY_FLAG, f"measurement without a coded concept: {line}") for line in rest]
    if result.gate_loosened:
        items.append(text_item(c.GATE_LOOSENED, result.gate_loosened))
    group[0].ContentSequence.extend(items)
    return group


def cannot_grade_group(result: VersionResult, *, report_uid: str, algorithm_version: str,
                       manufacturer: str) -> MeasurementsAndQualitativeEvaluations:
    """A group with no Finding that says why: highdicom's TID 1500 needs one group, and a reader looks there."""
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=derived_uid(report_uid, "cannot-grade"),
                                               identifier="grading not possible"),
        algorithm_id=node_algorithm_id(algorithm_version, manufacturer),
    )
    reason = plain_names(result.cannot_grade or "no model produced a result")
    items = [text_item(c.CANNOT_GRADE, reason),
             text_item(c.MISSING_INPUTS, missing_text(result)),
             text_item(c.INPUTS_USED, inputs_text(result))]
    items += [text_item(c.MODEL_PATH, plain_names(d.reason)) for d in result.decisions]
    items += [text_item(c.QUALITY_FLAG, f) for f in result.quality_flags]
    group[0].ContentSequence.extend(items)
    return group


def version_evaluations(result: VersionResult) -> ContainerContentItem:
    """TID 1500's "Qualitative Evaluations" container: the disclaimer and the version-level story.

    Decisions (which model paths ran or not, and why), inputs, missing roles,
    version quality flags and what this report supersedes apply to the whole
    document, not to one model, so they sit here rather than in a group.
    """
    container = ContainerContentItem(name=c.QUALITATIVE_EVALUATIONS.concept, is_content_continuous=False,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    items = [text_item(c.DISCLAIMER, DISCLAIMER_TEXT)]
    warning = synthetic_warning(result)
    if warning:  # next to the disclaimer: a viewer that shows the first lines shows this too
        items.append(text_item(c.TRAINING_DATA, warning))
    if result.cannot_grade or not result.results:
        items.append(text_item(c.CANNOT_GRADE, plain_names(result.cannot_grade or "no model produced a result")))
    declined = {d.family for d in result.declined}
    for d in result.decisions:
        state = ("selected, then declined by the input gate" if d.family in declined
                 else "ran" if d.runs else "did not run")
        items.append(text_item(c.MODEL_PATH, f"{family_title(d.family)}: {state}. {plain_names(d.reason)}"))
    items.append(text_item(c.INPUTS_USED, inputs_text(result)))
    items.append(text_item(c.MISSING_INPUTS, missing_text(result)))
    items += [text_item(c.DECLINED, declined_text(d)) for d in result.declined]
    if result.gate_loosened:
        items.append(text_item(c.GATE_LOOSENED, result.gate_loosened))
    items += [text_item(c.QUALITY_FLAG, f) for f in result.quality_flags]
    if result.supersedes is not None:
        s = result.supersedes
        items.append(text_item(c.SUPERSEDES, (
            f"This report replaces the report of study version {s.version} "
            f"(SR SOP Instance UID {s.sop_instance_uid}, series {s.series_instance_uid}); "
            f"it covers study version {result.version}.")))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
