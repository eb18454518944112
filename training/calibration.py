"""Calibration: expected calibration error, reliability diagrams, temperature scaling.

Why this module exists: the node reports a *probability* of HGG (IDH-mutant,
1p/19q-codeleted) to a radiologist, not only a label. Deep networks trained
with cross-entropy are typically over-confident (Guo et al., "On Calibration
of Modern Neural Networks", ICML 2017), so a 0.97 may be right far less than
97 % of the time. Temperature scaling divides the logits by one scalar T > 0
fitted on *validation* data: it changes no decision (argmax and ranking, hence
AUC, are unchanged) but makes the probabilities honest. The fitted T is
stored in the checkpoint so the node applies the same T.

Conventions:

- **ECE** uses equal-width bins on [0, 1] (default 15, as in Guo et al.);
  bin b is (edge_b, edge_{b+1}], the first bin also takes 0. ECE is the
  count-weighted mean |observed - predicted| over non-empty bins; MCE their
  maximum.
- **What is binned** (``mode``): ``"top-label"`` (default, Guo et al.) bins
  the confidence of the predicted class against how often that prediction
  was right; for binary inputs the prediction is positive when
  ``p >= 0.5``, as in :mod:`training.metrics`. ``"positive"`` (binary only)
  bins P(class 1) against the observed fraction of class 1, the curve of
  ``sklearn.calibration.calibration_curve``, which reads more naturally for
  "probability of HGG".
- **Logit layouts**: shape (N,) is one logit per case, p = sigmoid(z / T);
  shape (N, C) with C >= 2 is softmax(z / T) (a 2-logit binary head is C = 2).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from training.metrics import as_array

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn: training loops stay light
    from matplotlib.axes import Axes

Mode = Literal["top-label", "positive"]
DEFAULT_BINS = 15
DEFAULT_BOUNDS: tuple[float, float] = (0.05, 20.0)


# --------------------------------------------------------------------------- ECE and reliability


@dataclass(frozen=True)
class ReliabilityData:
    """Per-bin calibration data: what a reliability diagram draws, and the ECE it implies.

    ``mean_predicted[b]`` is the mean binned probability in bin b,
    ``observed[b]`` the accuracy (top-label) or positive fraction (positive
    mode) there, ``count[b]`` the number of cases; empty bins hold NaN.
    """

    mode: Mode
    bin_edges: np.ndarray
    mean_predicted: np.ndarray
    observed: np.ndarray
    count: np.ndarray
    ece: float
    mce: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (NaN for empty bins becomes None)."""

        def clean(a: np.ndarray) -> list[float | None]:
            return [None if math.isnan(float(v)) else float(v) for v in a]

        return {
            "mode": self.mode,
            "bin_edges": [float(v) for v in self.bin_edges],
            "mean_predicted": clean(self.mean_predicted),
            "observed": clean(self.observed),
            "count": [int(v) for v in self.count],
            "ece": self.ece,
            "mce": self.mce,
            "n": self.n,
        }


def _confidence_and_outcome(y_true: Any, probs: Any, mode: Mode) -> tuple[np.ndarray, np.ndarray]:
    """What is binned (confidence) and what it is compared with (0/1 outcome), per case."""
    if mode not in ("top-label", "positive"):
        raise ValueError(f"mode must be 'top-label' or 'positive', got {mode!r}")
    p = as_array(probs).astype(np.float64)
    y = as_array(y_true)
    if p.ndim not in (1, 2):
        raise ValueError(f"probabilities must have shape (N,) or (N, C), got {p.shape}")
    if len(y) != len(p) or y.ndim != 1:
        raise ValueError(f"labels must have shape ({len(p)},), got {y.shape}")
    if len(p) == 0:
        raise ValueError("no cases")
    if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probabilities must be finite and in [0, 1] (pass probabilities, not logits)")
    y = y.astype(np.int64)
    if p.ndim == 1:
        if not set(np.unique(y).tolist()) <= {0, 1}:
            raise ValueError("binary labels must be 0 or 1")
        if mode == "positive":
            return p, y.astype(np.float64)
        pred = (p >= 0.5).astype(np.int64)
        conf = np.where(pred == 1, p, 1.0 - p)
        return conf, (pred == y).astype(np.float64)
    n_classes = p.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes - 1}]")
    if mode == "positive":
        if n_classes != 2:
            raise ValueError("mode='positive' needs binary probabilities")
        return p[:, 1], y.astype(np.float64)
    pred = p.argmax(axis=1)
    return p.max(axis=1), (pred == y).astype(np.float64)


def reliability_data(y_true: Any, probs: Any, n_bins: int = DEFAULT_BINS, mode: Mode = "top-label") -> ReliabilityData:
    """Bin the cases by confidence and compare mean confidence with observed frequency."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, outcome = _confidence_and_outcome(y_true, probs, mode)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bin b holds (edges[b], edges[b+1]]; 0 falls in bin 0.
    which = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_conf = np.bincount(which, weights=conf, minlength=n_bins)
    sum_out = np.bincount(which, weights=outcome, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(count > 0, sum_conf / np.maximum(count, 1), np.nan)
        observed = np.where(count > 0, sum_out / np.maximum(count, 1), np.nan)
    filled = count > 0
    gaps = np.abs(observed[filled] - mean_pred[filled])
    ece = float(np.sum(count[filled] / len(conf) * gaps))
    mce = float(gaps.max()) if gaps.size else math.nan
    return ReliabilityData(mode, edges, mean_pred, observed, count, ece, mce, int(len(conf)))


def expected_calibration_error(
    y_true: Any, probs: Any, n_bins: int = DEFAULT_BINS, mode: Mode = "top-label"
) -> float:
    """ECE with ``n_bins`` equal-width bins (see the module docstring for the conventions)."""
    return reliability_data(y_true, probs, n_bins, mode).ece


def draw_reliability(
    ax: Axes,
    data: ReliabilityData,
    label: str,
    color: Any = None,
    hist_ax: Axes | None = None,
) -> None:
    """Draw one reliability curve (and, optionally, its bin counts) onto existing axes."""
    filled = data.count > 0
    ax.plot(
        data.mean_predicted[filled],
        data.observed[filled],
        marker="o",
        markersize=4,
        color=color,
        label=f"{label} (ECE {data.ece:.3f})",
    )
    if hist_ax is not None:
        centers = (data.bin_edges[:-1] + data.bin_edges[1:]) / 2
        hist_ax.step(centers, data.count, where="mid", color=color)


def save_reliability_diagram(
    datasets: Mapping[str, ReliabilityData], path: str | Path, title: str = "Reliability diagram"
) -> Path:
    """A PNG with the reliability curves of several models and their confidence histograms.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no global
    backend switch), so it is safe in a headless worker and in threads.
    """
    from matplotlib.figure import Figure

    if not datasets:
        raise ValueError("no reliability data to plot")
    modes = {d.mode for d in datasets.values()}
    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    ax, hist_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=1, label="perfect calibration")
    for i, (name, data) in enumerate(datasets.items()):
        draw_reliability(ax, data, name, color=f"C{i}", hist_ax=hist_ax)
    positive = modes == {"positive"}
    ax.set_ylabel("observed fraction positive" if positive else "observed accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist_ax.set_xlabel("predicted probability of class 1" if positive else "confidence")
    hist_ax.set_ylabel("cases")
    hist_ax.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------- temperature scaling


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature and the evidence for it, as stored in a checkpoint.

    ``note`` is non-empty when T was left at 1.0 because the validation data
    cannot determine it (one class only, or NLL still falling at a bound,
    i.e. the validation set is perfectly separated): sharpening a model to
    the limit on a handful of validation cases would be over-fitting.
    """

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    n: int
    layout: str  # "1-logit" or "softmax-C"
    bounds: tuple[float, float]
    note: str = ""
    fitted_on: str = field(default="validation")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint's calibration record."""
        return {
            "method": "temperature-scaling",
            "temperature": self.temperature,
            "fitted_on": self.fitted_on,
            "n": self.n,
            "layout": self.layout,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "bounds": list(self.bounds),
            "note": self.note,
        }


def _check_logits(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = as_array(logits).astype(np.float64)
    y = as_array(labels)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim not in (1, 2) or (z.ndim == 2 and z.shape[1] < 2):
        raise ValueError(f"logits must have shape (N,) or (N, C) with C >= 2, got {z.shape}")
    if y.ndim != 1 or len(y) != len(z):
        raise ValueError(f"labels must have shape ({len(z)},), got {y.shape}")
    if len(z) == 0:
        raise ValueError("no validation cases")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise ValueError("labels contain missing values (NaN): drop those cases first")
    y = y.astype(np.int64)
    n_classes = 2 if z.ndim == 1 else z.shape[1]
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be in [0, {n_classes - 1}] for logits of shape {z.shape}")
    return z, y


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under logits / T (numerically stable)."""
    s = z / temperature
    if s.ndim == 1:
        # -log sigmoid(s) for y=1, -log(1 - sigmoid(s)) = -log sigmoid(-s) for y=0.
        return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -s, s))))
    return float(-np.mean(log_softmax(s, axis=1)[np.arange(len(y)), y]))


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities: sigmoid(z/T) for shape (N,), softmax(z/T) over classes for (N, C)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    z = as_array(logits).astype(np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        return expit(z / temperature)
    if z.ndim == 2:
        return softmax(z / temperature, axis=1)
    raise ValueError(f"logits must have shape (N,) or (N, C), got {z.shape}")


def _probs_for_ece(z: np.ndarray, temperature: float) -> np.ndarray:
    return apply_temperature(z, temperature)


def temperature_fit(
    logits: Any,
    labels: Any,
    *,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    n_bins: int = DEFAULT_BINS,
) -> TemperatureFit:
    """Fit T > 0 minimising the NLL of *validation* labels under logits / T.

    A bounded 1-D search (Brent) over log T. The NLL is convex in 1/T (the
    logits enter linearly and the log-likelihood of a softmax is concave in
    them), so it has one minimum and a 1-D search finds it reliably, with no
    learning rate to tune. Never fit on test data: the test metrics would then
    describe a model tuned on its own test set.
    """
    lo, hi = bounds
    if not 0 < lo < 1 < hi:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    z, y = _check_logits(logits, labels)
    layout = "1-logit" if z.ndim == 1 else f"softmax-{z.shape[1]}"
    nll_1 = _nll(z, y, 1.0)
    ece_1 = expected_calibration_error(y, _probs_for_ece(z, 1.0), n_bins)

    def keep_one(note: str) -> TemperatureFit:
        warnings.warn(f"temperature scaling: {note}", RuntimeWarning, stacklevel=3)
        return TemperatureFit(1.0, nll_1, nll_1, ece_1, ece_1, len(y), layout, (lo, hi), note)

    if len(np.unique(y)) < 2:
        return keep_one("the validation labels have a single class; T left at 1.0")
    res = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)),
        bounds=(math.log(lo), math.log(hi)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    t = float(math.exp(res.x))
    if t <= lo * 1.001:
        return keep_one(
            f"the NLL is still falling at the lower bound T={lo:g} (the validation set is perfectly "
            "separated); T is not identifiable from these cases and was left at 1.0"
        )
    if t >= hi / 1.001:
        return keep_one(
            f"the NLL is still falling at the upper bound T={hi:g} (logits far over-confident, or most "
            "predictions wrong); T is not identifiable within the bounds and was left at 1.0: check the "
            "model, or widen `bounds`"
        )
    ece_t = expected_calibration_error(y, _probs_for_ece(z, t), n_bins)
    return TemperatureFit(t, nll_1, _nll(z, y, t), ece_1, ece_t, len(y), layout, (lo, hi))


def fit_temperature(
    logits: Any, labels: Any, *, bounds: tuple[float, float] = DEFAULT_BOUNDS
) -> float:
    """The fitted temperature T (see :func:`temperature_fit` for the details kept with it)."""
    return temperature_fit(logits, labels, bounds=bounds).temperature
