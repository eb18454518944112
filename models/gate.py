"""The gate: is this case like the data the model was trained on? Decline rather than guess.

Why here (``models``, not the node): the ranges and feature statistics are part of what a
checkpoint IS (they describe its training data), training writes them and the node reads them,
so both sides share these pure functions and one vocabulary (``models.measures``).

Two checks, both against statistics a checkpoint stores in ``extra["gate"]``::

    {"ranges": {name: [lo, hi]},           # per measurement, over the TRAINING cases
     "n_cases": int,
     "features": FeatureStats.to_dict()}   # optional: penultimate features of the network

1. **Measurements** (``check_measurements``): each measurement the checkpoint has a range for
   (brain volume, registration quality, slice thickness, coverage, ...) must lie inside the
   training range widened by ``margin * max(hi - lo, 0.1 * max(|lo|, |hi|))`` on the side(s)
   its ``direction`` names (``models.measures``): a thinner slice than training is fine, a
   thicker one is not. The 10 % floor keeps a constant training range (all cases at 1.0 mm)
   from declining 1.01 mm.
2. **Features** (``check_features``): the network's penultimate features of the case (what its
   head reads), as a Mahalanobis distance in the top-k principal components of the training
   features plus an isotropic residual term (probabilistic-PCA style: the full covariance of a
   few hundred cases in a few hundred dimensions cannot be inverted, and the residual term
   catches a case that moves off the training subspace). The threshold is a percentile
   (99th by default) of the distances of the VALIDATION cases: training cases sit closer to
   their own fit than new cases do, and test cases must never choose anything.

Everything is stored as plain JSON lists (the checkpoint's ``extra`` is hashed as canonical JSON).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.measures import MEASURES, Measure, label_of, split

__all__ = [
    "FLOOR_METRICS",
    "FeatureStats",
    "FloorSettings",
    "GateFinding",
    "GateSettings",
    "UNCHECKED",
    "case_measurements",
    "check_features",
    "check_floor",
    "heldout_metrics",
    "withheld_sentence",
    "allowed_interval",
    "check_measurements",
    "feature_distance",
    "ranges_from",
]

#: what to do with a model whose checkpoint lacks the statistics to check (or a case lacking a measurement)
UNCHECKED: tuple[str, ...] = ("decline", "allow")
_DEFAULT_MARGIN = 0.25
_DEFAULT_FACTOR = 1.0
_FEATURE_NAME = "feature_distance"


# --------------------------------------------------------------------------- findings and settings


@dataclass(frozen=True)
class GateFinding:
    """One reason a model does not grade a case: the measurement, its value and the training range.

    ``value``/``low``/``high`` are None where they do not apply (a checkpoint without statistics,
    a measurement the case lacks); ``low``/``high`` are the training range (for the feature
    distance: 0 and the effective threshold). ``reason`` is one sentence for the SR.
    """

    name: str
    value: float | None
    unit: str
    low: float | None
    high: float | None
    reason: str


@dataclass(frozen=True)
class GateSettings:
    """How strict a site's gate is. The defaults are the design's; anything looser is reported.

    ``margin``: widening of each training range, as a fraction of its width (see module doc).
    ``feature_factor``: multiplies the feature-distance threshold. ``unchecked``: ``"decline"``
    (default) a model whose checkpoint records no statistics, or a case missing a measurement the
    checkpoint has a range for; ``"allow"`` lets them grade unchecked.
    """

    margin: float = _DEFAULT_MARGIN
    feature_factor: float = _DEFAULT_FACTOR
    unchecked: str = "decline"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"gate margin must be a finite number >= 0, got {self.margin!r}")
        if not (math.isfinite(self.feature_factor) and self.feature_factor > 0):
            raise ValueError(f"gate feature_factor must be a finite number > 0, got {self.feature_factor!r}")
        if self.unchecked not in UNCHECKED:
            raise ValueError(f"gate unchecked must be one of {UNCHECKED}, got {self.unchecked!r}")

    @property
    def loosened(self) -> bool:
        """True when any setting lets through more than the defaults would (the SR must say so)."""
        return (self.margin > _DEFAULT_MARGIN or self.feature_factor > _DEFAULT_FACTOR
                or self.unchecked == "allow")

    def describe(self) -> str:
        """One sentence for the SR saying how the gate was loosened ("" when it was not)."""
        if not self.loosened:
            return ""
        parts: list[str] = []
        if self.margin > _DEFAULT_MARGIN:
            parts.append(f"measurement ranges widened by {self.margin:.0%} of the training range "
                         f"(default {_DEFAULT_MARGIN:.0%})")
        if self.feature_factor > _DEFAULT_FACTOR:
            parts.append(f"the image-feature threshold multiplied by {self.feature_factor:g}")
        if self.unchecked == "allow":
            parts.append("models without training-data statistics, and measurements that could not be "
                         "taken, allowed unchecked")
        return "The input gate was loosened at this site: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- measurements


def case_measurements(meta: Mapping[str, Any]) -> dict[str, float]:
    """The measurements of one prepared case: ``meta["measurements"]`` plus the source geometry.

    ``models.preprocess.apply_spec`` records them all, the source geometry
    (``slice_thickness_mm``, ``inplane_spacing_mm``, ``slices`` per role) for every spec; a meta
    written before it did (an older case file or cache) lacks some, and the source geometry is
    then derived from ``meta["original"]`` with the same function (``source_measurements``), so a
    name means the same number on the training and the serving side. Non-finite values are kept
    (the check declines them).
    """
    given = meta.get("measurements") or {}
    out = {str(k): float(v) for k, v in given.items() if v is not None}
    original = meta.get("original") or {}
    if original:
        from models.preprocess import source_measurements  # lazily: the gate itself needs no imaging stack

        for name, value in source_measurements(original).items():
            out.setdefault(name, float(value))
    return out


def ranges_from(measurements: Iterable[Mapping[str, float]]) -> dict[str, list[float]]:
    """``{name: [min, max]}`` over the cases that have a finite value of ``name`` (sorted by name).

    A name present in only some cases gets the range of those; a name with no finite value is
    left out (the gate has nothing to compare with).
    """
    values: dict[str, list[float]] = {}
    for case in measurements:
        for name, v in case.items():
            if v is None:
                continue
            x = float(v)
            if math.isfinite(x):
                values.setdefault(str(name), []).append(x)
    return {name: [min(vs), max(vs)] for name, vs in sorted(values.items())}


def _measure(name: str) -> Measure:
    """The measurement's description; an unknown name is checked on both sides with 2 decimals."""
    return MEASURES.get(split(name)[0], Measure(split(name)[0].replace("_", " "), "1", "both", 2))


def _num(x: float, decimals: int) -> str:
    return f"{x:,.{decimals}f}"


def _with_unit(text: str, unit: str) -> str:
    return text if unit == "1" else f"{text} {unit}"


def allowed_interval(lo: float, hi: float, margin: float, direction: str) -> tuple[float, float]:
    """The values that pass for training range [lo, hi]: widened by ``margin`` times the width
    (at least 10 % of the larger magnitude), and open on the side ``direction`` does not check."""
    width = max(hi - lo, 0.1 * max(abs(lo), abs(hi)))
    low, high = lo - margin * width, hi + margin * width
    if direction == "upper":
        low = -math.inf
    elif direction == "lower":
        high = math.inf
    elif direction != "both":
        raise ValueError(f"unknown measurement direction {direction!r}")
    return low, high


def _unchecked_finding(name: str, reason: str) -> GateFinding:
    return GateFinding(name=name, value=None, unit="", low=None, high=None, reason=reason)


def check_measurements(gate: Mapping[str, Any] | None, measurements: Mapping[str, float],
                       settings: GateSettings = GateSettings()) -> list[GateFinding]:
    """The measurements of a case that lie outside what the checkpoint was trained on (empty: passes).

    Only names the checkpoint has a range for are checked. A checkpoint without ranges gives one
    finding ("this checkpoint records no training-data ranges"), and a checked measurement the
    case lacks (or whose value is not finite) one finding each, unless ``settings.unchecked`` is
    ``"allow"``.
    """
    ranges = (gate or {}).get("ranges")
    if not ranges:
        if settings.unchecked == "allow":
            return []
        return [_unchecked_finding("training_ranges", "this checkpoint records no training-data ranges")]
    findings: list[GateFinding] = []
    for name in sorted(ranges):
        lo, hi = (float(v) for v in ranges[name])
        m = _measure(name)
        trained = _with_unit(f"{_num(lo, m.decimals)}–{_num(hi, m.decimals)}", m.unit)
        value = measurements.get(name)
        if value is None or not math.isfinite(float(value)):
            if settings.unchecked == "allow":
                continue
            findings.append(GateFinding(name=name, value=None, unit=m.unit, low=lo, high=hi,
                                        reason=f"{label_of(name)} could not be measured; "
                                               f"this model was trained on {trained}"))
            continue
        x = float(value)
        low, high = allowed_interval(lo, hi, settings.margin, m.direction)
        if low <= x <= high:
            continue
        # enough decimals that the value does not print like a bound (1.04 mm vs 1.0–1.0 mm)
        d = m.decimals
        while d < m.decimals + 3 and _num(x, d) in (_num(lo, d), _num(hi, d)):
            d += 1
        trained = _with_unit(f"{_num(lo, d)}–{_num(hi, d)}", m.unit)
        findings.append(GateFinding(
            name=name, value=x, unit=m.unit, low=lo, high=hi,
            reason=f"{label_of(name)} {_with_unit(_num(x, d), m.unit)}; this model was trained on {trained}"))
    return findings


# --------------------------------------------------------------------------- features


def _as_2d(a: Any, what: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be (N, F), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds non-finite values")
    return x


@dataclass(frozen=True)
class FeatureStats:
    """Mean, top-k principal components with their variances, and a residual variance of the
    training features; ``threshold`` is the ``percentile`` of the validation distances.

    ``distance(f)`` = sqrt(sum_k (u_k . (f - mean))^2 / var_k + |residual|^2 / residual_var),
    residual = (f - mean) minus its projection onto the k components. For Gaussian features of
    the training distribution the squared distance is about F on average.
    """

    mean: np.ndarray  # (F,)
    components: np.ndarray  # (k, F), orthonormal rows
    variances: np.ndarray  # (k,)
    residual_var: float
    threshold: float
    percentile: float = 99.0
    chosen_on: str = "validation"
    n_fit: int = 0
    n_val: int = 0

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, train: np.ndarray, val: np.ndarray, percentile: float = 99.0, components: int = 16) -> FeatureStats:
        """Fit on the TRAINING features (N, F); threshold = ``percentile`` of the VALIDATION distances.

        ``components`` is capped at min((N - 1) // 2, F): N centred cases span at most N - 1
        directions, and the residual variance must be estimated from some of them (with k = N - 1
        it would be zero, and every new case infinitely far off the training subspace).
        Variances (ddof 1) are floored at 1e-6 of the mean variance per dimension (1e-12
        absolute), so a dead feature (constant over training) makes a case that moves it far,
        not infinitely far.
        """
        x = _as_2d(train, "training features")
        v = _as_2d(val, "validation features")
        n, f = x.shape
        if n < 2:
            raise ValueError(f"feature statistics need at least 2 training cases, got {n}")
        if v.shape[0] < 1:
            raise ValueError("the feature threshold needs at least one validation case")
        if v.shape[1] != f:
            raise ValueError(f"validation features have {v.shape[1]} dimensions, training features {f}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if components < 0:
            raise ValueError(f"components must be >= 0, got {components}")
        mean = x.mean(axis=0)
        centred = x - mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        eig = (s ** 2) / (n - 1)  # variances along the principal axes, descending
        total = float((centred ** 2).sum() / (n - 1))
        floor = max(1e-6 * total / f, 1e-12)
        k = int(min(components, (n - 1) // 2, f))
        variances = np.maximum(eig[:k], floor)
        rest = f - k
        residual_var = max((total - float(eig[:k].sum())) / rest, floor) if rest > 0 else floor
        stats = cls(mean=mean, components=vt[:k].copy(), variances=variances, residual_var=float(residual_var),
                    threshold=math.inf, percentile=float(percentile), chosen_on="validation",
                    n_fit=int(n), n_val=int(v.shape[0]))
        threshold = float(np.percentile(stats.distance(v), percentile))
        return cls(mean=stats.mean, components=stats.components, variances=stats.variances,
                   residual_var=stats.residual_var, threshold=threshold, percentile=stats.percentile,
                   chosen_on="validation", n_fit=stats.n_fit, n_val=stats.n_val)

    def distance(self, f: np.ndarray) -> np.ndarray:
        """(N,) distances of features (N, F) (or one (F,) vector -> shape (1,))."""
        x = _as_2d(f, "features")
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions; this checkpoint's statistics have {self.dim}")
        d = x - self.mean
        proj = d @ self.components.T  # (N, k)
        resid = d - proj @ self.components
        sq = (proj ** 2 / self.variances).sum(axis=1) + (resid ** 2).sum(axis=1) / self.residual_var
        return np.sqrt(np.maximum(sq, 0.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (lists of floats), the form ``extra["gate"]["features"]`` stores."""
        return {
            "dim": self.dim,
            "mean": [float(v) for v in self.mean],
            "components": [[float(v) for v in row] for row in self.components],
            "variances": [float(v) for v in self.variances],
            "residual_var": float(self.residual_var),
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "chosen_on": self.chosen_on,
            "n_fit": int(self.n_fit),
            "n_val": int(self.n_val),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        """Rebuild from :meth:`to_dict`'s data; ValueError when it is inconsistent."""
        try:
            dim = int(d["dim"])
            mean = np.asarray(d["mean"], dtype=np.float64).reshape(-1)
            comps = np.asarray(d["components"], dtype=np.float64).reshape(-1, dim) if d["components"] else \
                np.zeros((0, dim))
            variances = np.asarray(d["variances"], dtype=np.float64).reshape(-1)
            stats = cls(mean=mean, components=comps, variances=variances, residual_var=float(d["residual_var"]),
                        threshold=float(d["threshold"]), percentile=float(d.get("percentile", 99.0)),
                        chosen_on=str(d.get("chosen_on", "validation")), n_fit=int(d.get("n_fit", 0)),
                        n_val=int(d.get("n_val", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"feature statistics are malformed: {exc}") from exc
        if mean.shape != (dim,) or comps.shape[0] != variances.shape[0]:
            raise ValueError(f"feature statistics are inconsistent: dim {dim}, mean {mean.shape}, "
                             f"components {comps.shape}, variances {variances.shape}")
        if not (np.all(variances > 0) and stats.residual_var > 0 and math.isfinite(stats.threshold)):
            raise ValueError("feature statistics need positive variances and a finite threshold")
        return stats


def _ordinal(p: float) -> str:
    n = int(p) if float(p).is_integer() else None
    if n is None:
        return f"{p:g}th"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def check_features(gate: Mapping[str, Any] | None, distance: float | None,
                   settings: GateSettings = GateSettings()) -> GateFinding | None:
    """A finding when the case's feature distance exceeds the checkpoint's threshold times
    ``settings.feature_factor``; None when it passes.

    A checkpoint without feature statistics (or no distance: the features could not be computed)
    gives a finding unless ``settings.unchecked`` is ``"allow"``.
    """
    stats = (gate or {}).get("features")
    if not stats:
        if settings.unchecked == "allow":
            return None
        return _unchecked_finding(_FEATURE_NAME, "this checkpoint records no image-feature statistics")
    threshold = float(stats["threshold"]) * settings.feature_factor
    pct = _ordinal(float(stats.get("percentile", 99.0)))
    on = str(stats.get("chosen_on", "validation"))
    basis = (f"the {pct} percentile on {on} cases" if settings.feature_factor == 1.0
             else f"{settings.feature_factor:g} × the {pct} percentile on {on} cases")
    if distance is None or not math.isfinite(float(distance)):
        if settings.unchecked == "allow":
            return None
        return GateFinding(name=_FEATURE_NAME, value=None, unit="1", low=0.0, high=threshold,
                           reason=f"image features could not be compared with the training data "
                                  f"(threshold {threshold:.1f}, {basis})")
    d = float(distance)
    if d <= threshold:
        return None
    return GateFinding(name=_FEATURE_NAME, value=d, unit="1", low=0.0, high=threshold,
                       reason=f"image features are unlike the training data (distance {d:.1f}; "
                              f"threshold {threshold:.1f}, {basis})")


def feature_distance(gate: Mapping[str, Any] | None, features: np.ndarray | Sequence[float]) -> float | None:
    """The distance of one case's features under the checkpoint's statistics (None: none recorded)."""
    stats = (gate or {}).get("features")
    if not stats:
        return None
    return float(FeatureStats.from_dict(stats).distance(np.asarray(features, dtype=np.float64).reshape(1, -1))[0])


# --------------------------------------------------------------------------- the floor (held-out metrics)

#: the held-out metrics the floor checks, in the order reasons name them: (key in the metrics, label)
FLOOR_METRICS: tuple[tuple[str, str], ...] = (("auc", "AUC"), ("sensitivity", "sensitivity"),
                                              ("specificity", "specificity"))
_DEFAULT_FLOOR: dict[str, float] = {"auc": 0.70, "sensitivity": 0.5, "specificity": 0.5}
#: how reasons name the tasks (models.base.TASKS keys)
TASK_TITLES: dict[str, str] = {"grade": "grade", "idh": "IDH", "1p19q": "1p/19q"}


def _task_title(task: str) -> str:
    return TASK_TITLES.get(task, task)


@dataclass(frozen=True)
class FloorSettings:
    """The least a checkpoint must have shown on its HELD-OUT (test) cases, per task, to be trusted.

    Why a floor: a checkpoint that validates (hash, spec, labels) can still be a model that learned
    nothing (the suite's tiny checkpoints) or a degenerate one (every case called HGG: sensitivity
    1.0, specificity 0.0). Its own held-out metrics, recorded by training, say so; the node refuses
    to report a task under the floor rather than print a confident-looking guess. 0 disables a check.
    """

    auc: float = _DEFAULT_FLOOR["auc"]
    sensitivity: float = _DEFAULT_FLOOR["sensitivity"]
    specificity: float = _DEFAULT_FLOOR["specificity"]

    def __post_init__(self) -> None:
        for key, _ in FLOOR_METRICS:
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"floor {key} must be a number in [0, 1], got {v!r}")

    def floors(self) -> dict[str, float]:
        """``{metric: floor}`` of the checks that are on (floor > 0)."""
        return {key: float(getattr(self, key)) for key, _ in FLOOR_METRICS if getattr(self, key) > 0}

    @property
    def loosened(self) -> bool:
        """True when any floor is below the design's default (the SR must say so)."""
        return any(getattr(self, key) < _DEFAULT_FLOOR[key] for key, _ in FLOOR_METRICS)

    def describe(self) -> str:
        """One sentence for the SR saying how the floor was lowered ("" when it was not)."""
        if not self.loosened:
            return ""
        parts = []
        for key, label in FLOOR_METRICS:
            v = float(getattr(self, key))
            if v < _DEFAULT_FLOOR[key]:
                now = "not checked" if v == 0 else f"{v:.2f}"
                parts.append(f"held-out {label} {now} (default {_DEFAULT_FLOOR[key]:.2f})")
        return "The floor on the models' held-out metrics was lowered at this site: " + "; ".join(parts) + "."


def heldout_metrics(metrics: Mapping[str, Any] | None, task: str, tasks: Sequence[str]) -> dict[str, float]:
    """The finite held-out (``metrics["test"]``) values of ``task`` that the floor checks.

    Multi-task checkpoints (MMDLM) store ``metrics["test"][task]``; single-task ones
    (``training.export`` for PromptNet, the 3D CNN, cross-modal) store the one task's metrics
    directly in ``metrics["test"]``. NaN (e.g. an AUC over a test part with one class) counts as
    not recorded.
    """
    test = (metrics or {}).get("test")
    if not isinstance(test, Mapping):
        return {}
    per_task = test.get(task)
    if isinstance(per_task, Mapping):
        found: Mapping[str, Any] = per_task
    elif len(tasks) == 1 and task in tasks and any(key in test for key, _ in FLOOR_METRICS):
        found = test
    else:
        return {}
    out: dict[str, float] = {}
    for key, _ in FLOOR_METRICS:
        v = found.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _floor_reasons(metrics: Mapping[str, Any] | None, task: str, tasks: Sequence[str], floor: FloorSettings,
                   tag: str) -> list[GateFinding]:
    """The findings of one task; ``tag`` (" (IDH)" or "") follows the metric's name in each reason."""
    floors = floor.floors()
    if not floors:
        return []
    checked = {k: v for k, v in heldout_metrics(metrics, task, tasks).items() if k in floors}
    if not checked:
        return [GateFinding(name=f"heldout/{task}", value=None, unit="1", low=None, high=None,
                            reason=f"no held-out metrics recorded{tag}")]
    labels = dict(FLOOR_METRICS)
    out = [GateFinding(name=f"heldout_{k}/{task}", value=v, unit="1", low=floors[k], high=None,
                       reason=f"held-out {labels[k]} {v:.2f}{tag} is under the floor {floors[k]:.2f}")
           for k, v in checked.items() if v < floors[k]]
    missing = [labels[k] for k, _ in FLOOR_METRICS if k in floors and k not in checked]
    if out and missing:  # judged on what is stored: say what was not
        last = out[-1]
        out[-1] = GateFinding(name=last.name, value=last.value, unit=last.unit, low=last.low, high=last.high,
                              reason=f"{last.reason} (held-out {_and(missing)} not recorded)")
    return out


def check_floor(metrics: Mapping[str, Any] | None, tasks: Sequence[str],
                floor: FloorSettings = FloorSettings()) -> dict[str, list[GateFinding]]:
    """``{task: findings}`` for each of ``tasks`` whose held-out metrics fall under ``floor`` (empty: all pass).

    ``metrics`` is the checkpoint's ``metrics``; ``tasks`` the family's task names (models.base.TASKS
    keys). Each finding's reason is one sentence, e.g. "held-out AUC 0.50 (grade) is under the floor
    0.70"; its name is ``"heldout_<metric>/<task>"`` (``"heldout/<task>"``: nothing recorded), ``low``
    the floor, ``high`` None. A task with none of the checked metrics recorded is under the floor
    ("no held-out metrics recorded"); one lacking only some is judged on the rest. All floors 0:
    nothing is checked.
    """
    out: dict[str, list[GateFinding]] = {}
    for task in tasks:
        findings = _floor_reasons(metrics, task, tasks, floor, f" ({_task_title(task)})")
        if findings:
            out[task] = findings
    return out


def withheld_sentence(metrics: Mapping[str, Any] | None, task: str, tasks: Sequence[str],
                      floor: FloorSettings = FloorSettings()) -> str | None:
    """``"IDH not reported: held-out AUC 0.57 is under the floor 0.70"`` (None: the task passes)."""
    findings = _floor_reasons(metrics, task, tasks, floor, "")
    if not findings:
        return None
    return f"{_task_title(task)} not reported: " + "; ".join(f.reason for f in findings)
