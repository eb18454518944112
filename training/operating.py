"""The operating threshold: chosen on validation data, reported on held-out data, stored in the checkpoint.

Why this module exists: labelling a case by argmax is a fixed threshold of 0.5
on P(positive), which is only sensible when the classes are balanced and the
probabilities calibrated to them. Trained on an imbalanced cohort (79 HGG /
21 LGG), a network's P(HGG) sits above 0.5 for nearly everyone, so argmax calls
every case HGG: held-out specificity 0.00, and the node's floor
(``models.gate``: sensitivity and specificity >= 0.5) rightly withholds it.
The threshold is therefore chosen per task on the *validation* part (never the
test part, which would make the reported test metrics optimistic), stored in
the checkpoint (``thresholds``), and used by the node instead of 0.5.

The rule is Youden's J (sensitivity + specificity - 1), which weighs both
errors equally whatever the class balance; that is what the floor checks.

Conventions shared with :mod:`training.metrics`: label 1 is the positive
class, and a case is positive when ``p_positive >= threshold``. The
probabilities passed in must be the ones the node thresholds: the calibrated
ones (``training.calibration.apply_temperature``) when a temperature was fitted.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from training.metrics import as_array, binary_metrics, bootstrap_ci, check_binary

THRESHOLD_RULE = "youden_val"
"""Recorded beside every stored threshold, so a reader knows how it was chosen."""

DEFAULT_THRESHOLD = 0.5
"""Used when validation cannot choose (empty, one class, or no cut better than chance): argmax."""

CI_LEVEL = 0.95


def youden_threshold(y: ArrayLike, p: ArrayLike) -> float:
    """The threshold on P(positive) that maximises Youden's J on validation data.

    Candidate cuts are the midpoints between adjacent distinct validation
    scores. Why midpoints: every threshold in ``(s_i, s_{i+1}]`` classifies the
    validation cases alike, so J cannot tell them apart; the midpoint is the
    choice farthest from both neighbouring cases, so a new case scored like a
    validation case is not flipped by a rounding difference, and it always lies
    strictly inside (0, 1), which the checkpoint requires.

    Ties between different intervals (equal J) go to the cut nearest 0.5: the
    threshold moves no farther from argmax than validation gives reason to.
    An exact tie in distance goes to the lower cut (more cases called positive),
    which keeps the result deterministic.

    Returns 0.5 (argmax) when ``y`` is empty, holds one class, or no cut beats
    chance (best J <= 0): validation then says nothing about where to cut.
    """
    y_arr = as_array(y)
    p_arr = as_array(p)
    if y_arr.size == 0 and p_arr.size == 0:
        return DEFAULT_THRESHOLD
    labels, scores = check_binary(y_arr, p_arr)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return DEFAULT_THRESHOLD
    distinct = np.unique(scores)  # sorted ascending
    if distinct.size < 2:
        return DEFAULT_THRESHOLD
    lower, upper = distinct[:-1], distinct[1:]
    cuts = lower + (upper - lower) / 2.0
    # Guard against rounding for scores a few ULPs apart: the cut must lie strictly above ``lower``.
    cuts = np.where(cuts > lower, cuts, np.nextafter(lower, upper))
    # With cut c between lower[i] and upper[i], the positives are the cases scored >= upper[i].
    order = np.sort(scores)
    idx_first_pos = np.searchsorted(order, upper, side="left")
    sorted_labels = labels[np.argsort(scores, kind="stable")]
    pos_at_or_above = n_pos - np.concatenate(([0], np.cumsum(sorted_labels)))[idx_first_pos]
    neg_at_or_above = (len(labels) - idx_first_pos) - pos_at_or_above
    sensitivity = pos_at_or_above / n_pos
    specificity = 1.0 - neg_at_or_above / n_neg
    j = sensitivity + specificity - 1.0
    best = float(j.max())
    if best <= 1e-12:
        return DEFAULT_THRESHOLD
    tied = np.flatnonzero(j >= best - 1e-12)
    distance = np.abs(cuts[tied] - DEFAULT_THRESHOLD)
    nearest = tied[distance <= distance.min() + 1e-15]
    return float(cuts[nearest].min())


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None, as ``promptnet._metrics`` does: JSON has no NaN and None reads as "undefined"."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _split_metrics(y: ArrayLike, p: ArrayLike, threshold: float) -> dict[str, Any]:
    y_arr, p_arr = as_array(y), as_array(p)
    if y_arr.size == 0 and p_arr.size == 0:
        out: dict[str, Any] = {"n": 0}
    else:
        out = _plain(binary_metrics(y_arr, p_arr, threshold=threshold).as_dict())
    out["threshold"] = float(threshold)
    out["threshold_rule"] = THRESHOLD_RULE
    return out


def heldout_metrics(
    y_val: ArrayLike,
    p_val: ArrayLike,
    y_test: ArrayLike,
    p_test: ArrayLike,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Validation and test metrics at the Youden threshold chosen on validation, and that threshold.

    Why together: the threshold and the metrics measured at it must never
    come apart (the floor reads sensitivity/specificity from the checkpoint
    and the node labels with the stored threshold), so one call produces both.
    The test dict adds ``auc_ci`` = [low, high], the 95 % stratified percentile
    bootstrap interval of the test AUC (``training.metrics.bootstrap_ci``;
    [None, None] when the test part has one class), and ``n``.
    An empty part gives ``{"n": 0, "threshold": ..., "threshold_rule": ...}``.
    """
    threshold = youden_threshold(y_val, p_val)
    val = _split_metrics(y_val, p_val, threshold)
    test = _split_metrics(y_test, p_test, threshold)
    if test["n"]:
        ci = bootstrap_ci(y_test, p_test, "auc", n_boot=n_boot, level=CI_LEVEL, threshold=threshold, seed=seed)
        test["auc_ci"] = [None if math.isnan(v) else float(v) for v in (ci.low, ci.high)]
    else:
        test["auc_ci"] = [None, None]
    test["auc_ci_level"] = CI_LEVEL
    test["auc_ci_n_boot"] = int(n_boot)
    return val, test, threshold
