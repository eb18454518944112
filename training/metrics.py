"""Binary classification metrics, their aggregation over repeats, and curve averaging.

Why this module exists: seed 000 reports every method as "mean±std over five
repeats" of AUC, PRC, accuracy, precision and sensitivity (its Table 1), and
every protocol here must be compared in exactly the same way. Definitions:

- the positive class is label 1 (HGG, IDH-mutant, 1p/19q-codeleted; the coding
  of ``models.base.TASKS``), and a case is predicted positive when
  ``p_positive >= threshold`` (0.5 by default);
- AUC is ``sklearn.metrics.roc_auc_score``; PRC is the *average precision*
  (``sklearn.metrics.average_precision_score``, the step-wise area, not the
  trapezoidal one, which is optimistic);
- precision = TP/(TP+FP), sensitivity = recall = TP/(TP+FN),
  specificity = TN/(TN+FP), F1 = 2TP/(2TP+FP+FN), accuracy = (TP+TN)/N.

A metric that is undefined on a split (AUC on a test part with one class;
precision with no predicted positives) is NaN with the reason recorded, never
a crash and never a silent 0, which would drag a mean down. Aggregation
ignores NaN repeats and reports how many it ignored. The spread is the
*sample* standard deviation (``ddof=1``): five repeats are a sample of the
splits one could have drawn, and the paper's "±" reads that way.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

METRIC_NAMES: tuple[str, ...] = ("auc", "prc", "accuracy", "precision", "sensitivity", "specificity", "f1")


# --------------------------------------------------------------------------- input checks


def as_array(x: Any) -> np.ndarray:
    """Any array-like (list, NumPy, CPU torch tensor) as a NumPy array, without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_binary(y_true: Any, p_positive: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert (labels in {0, 1}, probabilities in [0, 1]) of equal length.

    Why strict: passing logits, or labels coded 1/2, or a missing label NaN
    gives plausible-looking but wrong numbers, so these fail loudly here.
    """
    y = as_array(y_true)
    p = as_array(p_positive).astype(np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"y_true and p_positive must be 1-D, got shapes {y.shape} and {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries but p_positive has {len(p)}")
    if len(y) == 0:
        raise ValueError("no cases: y_true is empty")
    if y.dtype.kind not in "biuf":
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"y_true must be 0/1 labels, got dtype {y.dtype}") from None
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError("y_true contains missing labels (None/NaN): drop them first (training.metrics.drop_missing)")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"y_true must contain only 0 and 1, got values {sorted(values)}")
    if not np.isfinite(p).all():
        raise ValueError("p_positive contains NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"p_positive must be probabilities in [0, 1] (got min {p.min():.4g}, max {p.max():.4g}): "
            "pass sigmoid/softmax outputs, not logits"
        )
    return y.astype(np.int64), p


def drop_missing(y_true: Sequence[Any], p_positive: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Remove cases whose label is missing (None or NaN); returns (y, p, n_dropped).

    Why: IDH and 1p/19q are unknown for many cases (and for all BraTS cases);
    a multi-task model still predicts them, but only labelled cases can be
    scored.
    """
    p = as_array(p_positive)
    labels = list(y_true.tolist() if isinstance(y_true, np.ndarray) else y_true)
    if len(labels) != len(p):
        raise ValueError(f"y_true has {len(labels)} entries but p_positive has {len(p)}")
    keep = np.array(
        [not (v is None or (isinstance(v, float) and math.isnan(v))) for v in labels], dtype=bool
    )
    y = np.array([v for v, k in zip(labels, keep) if k], dtype=np.float64)
    return y, p[keep], int((~keep).sum())


# --------------------------------------------------------------------------- single split


@dataclass(frozen=True)
class BinaryMetrics:
    """The metrics of one evaluation (one repeat or fold) at one threshold.

    Undefined values are NaN; ``notes`` says why, e.g.
    ``"auc: undefined, test part has only class 1"``.
    """

    auc: float
    prc: float
    accuracy: float
    precision: float
    sensitivity: float
    specificity: float
    f1: float
    n: int
    n_positive: int
    n_negative: int
    tp: int
    fp: int
    tn: int
    fn: int
    threshold: float
    notes: tuple[str, ...] = field(default=())

    def value(self, name: str) -> float:
        """One metric by name (one of :data:`METRIC_NAMES`)."""
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown metric {name!r}; expected one of {METRIC_NAMES}")
        return float(getattr(self, name))

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON logs and checkpoint metadata); NaN stays NaN."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def _ratio(num: int, den: int, name: str, why: str, notes: list[str]) -> float:
    if den == 0:
        notes.append(f"{name}: undefined, {why}")
        return math.nan
    return num / den


def binary_metrics(y_true: Any, p_positive: Any, threshold: float = 0.5) -> BinaryMetrics:
    """AUC, PRC (average precision), accuracy, precision, sensitivity, specificity, F1.

    ``y_true``: 0/1 labels; ``p_positive``: probability of class 1;
    a case is called positive when ``p_positive >= threshold``.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    y, p = check_binary(y_true, p_positive)
    pred = p >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    fn = int(np.sum(~pred & pos))
    n_pos, n_neg = tp + fn, tn + fp
    notes: list[str] = []

    if n_pos and n_neg:
        auc = float(roc_auc_score(y, p))
    else:
        only = 1 if n_pos else 0
        auc = math.nan
        notes.append(f"auc: undefined, the evaluated cases have only class {only}")
    if n_pos:
        prc = float(average_precision_score(y, p))
    else:
        prc = math.nan
        notes.append("prc: undefined, no positive cases")
    precision = _ratio(tp, tp + fp, "precision", "no case predicted positive", notes)
    sensitivity = _ratio(tp, tp + fn, "sensitivity", "no positive cases", notes)
    specificity = _ratio(tn, tn + fp, "specificity", "no negative cases", notes)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, "f1", "no positive cases and none predicted positive", notes)
    return BinaryMetrics(
        auc=auc,
        prc=prc,
        accuracy=(tp + tn) / len(y),
        precision=precision,
        sensitivity=sensitivity,
        specificity=specificity,
        f1=f1,
        n=len(y),
        n_positive=n_pos,
        n_negative=n_neg,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        threshold=float(threshold),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- over repeats


@dataclass(frozen=True)
class MeanStd:
    """A metric over repeats: mean and sample std (ddof=1) of the defined values.

    ``n`` counts the repeats that contributed, ``n_undefined`` those that were
    NaN (left out). With one defined repeat the std is NaN (a sample std needs
    two) and :meth:`format` prints the mean alone.
    """

    mean: float
    std: float
    n: int
    n_undefined: int = 0

    def format(self, digits: int = 4) -> str:
        """Seed 000's style, ``"0.9451±0.0080"``; ``"n/a"`` when no repeat was defined."""
        if self.n == 0 or math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f}±{self.std:.{digits}f}"

    def __str__(self) -> str:
        return self.format()


def mean_std(values: Sequence[float] | np.ndarray) -> MeanStd:
    """Mean ± sample std (ddof=1) over the non-NaN values."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    ok = ~np.isnan(arr)
    good = arr[ok]
    n = int(good.size)
    if n == 0:
        return MeanStd(math.nan, math.nan, 0, int(arr.size))
    std = float(np.std(good, ddof=1)) if n > 1 else math.nan
    return MeanStd(float(np.mean(good)), std, n, int(arr.size - n))


def aggregate(results: Sequence[BinaryMetrics], names: Sequence[str] = METRIC_NAMES) -> dict[str, MeanStd]:
    """Each metric's mean ± sample std over repeats (Table 1's cells)."""
    if not results:
        raise ValueError("no results to aggregate")
    return {name: mean_std([r.value(name) for r in results]) for name in names}


def evaluate_repeats(
    repeats: Sequence[tuple[Any, Any]], threshold: float = 0.5
) -> tuple[list[BinaryMetrics], dict[str, MeanStd]]:
    """Metrics per repeat and their aggregate, from a list of (y_true, p_positive) pairs."""
    per = [binary_metrics(y, p, threshold) for y, p in repeats]
    return per, aggregate(per)


# --------------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap confidence interval of one metric on one evaluation."""

    metric: str
    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    n_valid: int  # resamples where the metric was defined


def bootstrap_ci(
    y_true: Any,
    p_positive: Any,
    metric: str = "auc",
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    threshold: float = 0.5,
    seed: int = 0,
) -> BootstrapCI:
    """Stratified percentile bootstrap CI of a metric on one test set.

    Why stratified (cases resampled within each class): it keeps both classes
    in every resample, so the AUC is always defined, and it matches the fixed
    class balance of a stratified test split. Optional: the paper reports the
    spread over repeats, not a CI; use this for a single external test set.
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    y, p = check_binary(y_true, p_positive)
    estimate = binary_metrics(y, p, threshold).value(metric)
    rng = np.random.RandomState(seed)
    groups = [np.flatnonzero(y == c) for c in (0, 1) if np.any(y == c)]
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([g[rng.randint(0, len(g), size=len(g))] for g in groups])
        values[b] = _metric_fast(y[idx], p[idx], metric, threshold)
    valid = values[~np.isnan(values)]
    alpha = (1.0 - level) / 2.0
    if valid.size == 0:
        low = high = math.nan
    else:
        low, high = (float(v) for v in np.quantile(valid, [alpha, 1.0 - alpha]))
    return BootstrapCI(metric, estimate, low, high, level, n_boot, int(valid.size))


def _metric_fast(y: np.ndarray, p: np.ndarray, metric: str, threshold: float) -> float:
    """One metric without re-validating the input (the bootstrap's inner loop)."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if metric == "auc":
        return float(roc_auc_score(y, p)) if n_pos and n_neg else math.nan
    if metric == "prc":
        return float(average_precision_score(y, p)) if n_pos else math.nan
    return binary_metrics(y, p, threshold).value(metric)


# --------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class MeanCurve:
    """A curve averaged over repeats on a common grid (seed 000's Fig. 2, with spread).

    ROC: ``x`` is the false-positive rate, ``y_mean``/``y_std`` the true-positive
    rate. PR: ``x`` is recall, ``y`` the *interpolated* precision (the best
    precision at that recall or higher), which is what makes curves of
    different repeats comparable point by point. ``std`` is the sample std
    (NaN everywhere with a single repeat). ``n`` repeats contributed;
    ``skipped`` says which were left out and why (a repeat with one class has
    no ROC curve).
    """

    kind: Literal["roc", "pr"]
    x: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    n: int
    skipped: tuple[str, ...] = ()


def roc_on_grid(y_true: Any, p_positive: Any, grid: np.ndarray) -> np.ndarray:
    """TPR at each FPR of ``grid``, linear between ROC points, upper value on vertical steps."""
    y, p = check_binary(y_true, p_positive)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return _interp_upper(fpr, tpr, grid)


def pr_on_grid(y_true: Any, p_positive: Any, grid: np.ndarray) -> np.ndarray:
    """Interpolated precision (max precision at recall >= r) at each recall r of ``grid``."""
    y, p = check_binary(y_true, p_positive)
    precision, recall, _ = precision_recall_curve(y, p)
    order = np.argsort(recall, kind="stable")
    r_sorted = recall[order]
    p_interp = np.maximum.accumulate(precision[order][::-1])[::-1]
    j = np.searchsorted(r_sorted, np.clip(grid, 0.0, 1.0), side="left")
    j = np.minimum(j, len(r_sorted) - 1)
    return p_interp[j]


def _interp_upper(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of a curve with repeated x (vertical steps).

    Why not ``np.interp`` alone: its behaviour with repeated x-values is not
    documented. Here, at an x shared by several points, the last (highest)
    point counts, and between distinct x-values the segment is linear, which
    is how an ROC curve with tied scores is drawn.
    """
    j = np.searchsorted(x, grid, side="right") - 1
    j = np.clip(j, 0, len(x) - 1)
    j_next = np.minimum(j + 1, len(x) - 1)
    x0, x1, y0, y1 = x[j], x[j_next], y[j], y[j_next]
    span = x1 - x0
    t = np.where(span > 0, (grid - x0) / np.where(span > 0, span, 1.0), 0.0)
    return y0 + np.clip(t, 0.0, 1.0) * (y1 - y0)


def mean_curve(
    repeats: Sequence[tuple[Any, Any]], kind: Literal["roc", "pr"], grid_points: int = 101
) -> MeanCurve:
    """Average the ROC or PR curves of several repeats on a common grid of ``grid_points``."""
    if kind not in ("roc", "pr"):
        raise ValueError(f"kind must be 'roc' or 'pr', got {kind!r}")
    if grid_points < 2:
        raise ValueError(f"grid_points must be >= 2, got {grid_points}")
    grid = np.linspace(0.0, 1.0, grid_points)
    curves: list[np.ndarray] = []
    skipped: list[str] = []
    for r, (y_true, p) in enumerate(repeats):
        y, pp = check_binary(y_true, p)
        n_pos = int(y.sum())
        if kind == "roc" and (n_pos == 0 or n_pos == len(y)):
            skipped.append(f"repeat {r}: only one class, no ROC curve")
            continue
        if kind == "pr" and n_pos == 0:
            skipped.append(f"repeat {r}: no positive cases, no PR curve")
            continue
        curves.append(roc_on_grid(y, pp, grid) if kind == "roc" else pr_on_grid(y, pp, grid))
    if not curves:
        nan = np.full(grid_points, math.nan)
        return MeanCurve(kind, grid, nan, nan.copy(), 0, tuple(skipped))
    stack = np.vstack(curves)
    std = stack.std(axis=0, ddof=1) if len(curves) > 1 else np.full(grid_points, math.nan)
    return MeanCurve(kind, grid, stack.mean(axis=0), std, len(curves), tuple(skipped))


def summary_dict(summary: Mapping[str, MeanStd]) -> dict[str, dict[str, float | int]]:
    """Aggregated metrics as plain data (for a checkpoint's ``metrics`` field or a JSON log)."""
    return {k: {"mean": v.mean, "std": v.std, "n": v.n, "n_undefined": v.n_undefined} for k, v in summary.items()}
