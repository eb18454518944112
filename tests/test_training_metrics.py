"""Metrics, calibration and reports of training/: hand-computed values, edge cases, rendered files."""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from training.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_data,
    save_reliability_diagram,
    temperature_fit,
)
from training.metrics import (
    MeanStd,
    aggregate,
    binary_metrics,
    bootstrap_ci,
    drop_missing,
    evaluate_repeats,
    mean_curve,
    mean_std,
    pr_on_grid,
    roc_on_grid,
    summary_dict,
)
from training.reports import (
    TABLE1_COLUMNS,
    MultiTaskRow,
    RowResult,
    load_predictions,
    multitask_table,
    save_predictions,
    save_roc_pr_figure,
    table1,
    write_report,
)

# A hand-checkable case: ROC points (0,0) (0,.5) (.5,.5) (.5,1) (1,1) -> AUC .75;
# ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-) -> AP = .5*1 + .5*(2/3) = 5/6.
Y = [0, 0, 1, 1]
P = [0.1, 0.4, 0.35, 0.8]


# --------------------------------------------------------------------------- metrics


def test_binary_metrics_match_hand_computed_values() -> None:
    m = binary_metrics(Y, P)  # predicted positive: only 0.8 -> TP1 FP0 TN2 FN1
    assert m.auc == pytest.approx(0.75)
    assert m.prc == pytest.approx(5 / 6)
    assert (m.tp, m.fp, m.tn, m.fn) == (1, 0, 2, 1)
    assert m.accuracy == pytest.approx(0.75)
    assert m.precision == pytest.approx(1.0)
    assert m.sensitivity == pytest.approx(0.5)
    assert m.specificity == pytest.approx(1.0)
    assert m.f1 == pytest.approx(2 / 3)
    assert m.notes == ()

    low = binary_metrics(Y, P, threshold=0.3)  # positive: .4 .35 .8 -> TP2 FP1 TN1 FN0
    assert (low.tp, low.fp, low.tn, low.fn) == (2, 1, 1, 0)
    assert low.precision == pytest.approx(2 / 3)
    assert low.sensitivity == 1.0 and low.specificity == 0.5
    assert low.f1 == pytest.approx(0.8)
    assert low.auc == m.auc  # threshold-free


def test_threshold_is_inclusive_and_inputs_may_be_tensors() -> None:
    m = binary_metrics(torch.tensor([0, 1]), torch.tensor([0.5, 0.5]))
    assert (m.tp, m.fp) == (1, 1)
    assert binary_metrics(np.array([True, False]), [0.9, 0.1]).accuracy == 1.0


def test_single_class_split_gives_nan_with_reason_not_a_crash() -> None:
    only_pos = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(only_pos.auc) and "only class 1" in only_pos.notes[0]
    assert only_pos.prc == pytest.approx(1.0)
    assert math.isnan(only_pos.specificity)
    assert only_pos.sensitivity == pytest.approx(2 / 3)

    only_neg = binary_metrics([0, 0], [0.1, 0.2])
    assert math.isnan(only_neg.auc) and math.isnan(only_neg.prc)
    assert math.isnan(only_neg.precision) and math.isnan(only_neg.sensitivity) and math.isnan(only_neg.f1)
    assert only_neg.specificity == 1.0 and only_neg.accuracy == 1.0
    assert any(n.startswith("precision: undefined") for n in only_neg.notes)


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([0, 1], [-2.0, 3.0], "not logits"),
        ([0, 2], [0.1, 0.9], "only 0 and 1"),
        ([0, float("nan")], [0.1, 0.9], "missing labels"),
        ([0, None], [0.1, 0.9], "missing labels"),
        ([0, 1, 1], [0.1, 0.9], "3 entries"),
        ([], [], "empty"),
        ([0, 1], [0.1, float("nan")], "NaN or infinite"),
        ([[0, 1]], [[0.1, 0.9]], "1-D"),
        (["a", "b"], [0.1, 0.9], "0/1 labels"),
    ],
)
def test_bad_metric_inputs_are_refused(y: list, p: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binary_metrics(y, p)


def test_mean_std_is_sample_std_and_formats_like_table_1() -> None:
    ms = mean_std([0.94, 0.95, 0.96])
    assert ms.mean == pytest.approx(0.95)
    assert ms.std == pytest.approx(0.01)  # ddof=1; ddof=0 would be 0.00816
    assert ms.format() == "0.9500±0.0100"
    assert MeanStd(0.9451, 0.0080, 5).format() == "0.9451±0.0080"
    assert str(MeanStd(0.9451, 0.0080, 5)) == "0.9451±0.0080"
    with_nan = mean_std([0.5, float("nan"), 0.7])
    assert (with_nan.n, with_nan.n_undefined) == (2, 1)
    assert with_nan.mean == pytest.approx(0.6)
    assert mean_std([0.8]).format() == "0.8000"
    assert mean_std([float("nan")]).format() == "n/a"


def test_aggregate_over_repeats() -> None:
    per, summary = evaluate_repeats([(Y, P), ([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8]), ([1, 1], [0.6, 0.9])])
    assert [m.auc for m in per][:2] == [pytest.approx(0.75), pytest.approx(1.0)]
    assert summary["auc"].n == 2 and summary["auc"].n_undefined == 1
    assert summary["auc"].mean == pytest.approx(0.875)
    assert summary["auc"].std == pytest.approx(math.sqrt(2 * 0.125**2))
    assert summary["accuracy"].n == 3
    assert aggregate(per, names=("f1",)).keys() == {"f1"}
    assert summary_dict(summary)["auc"]["n"] == 2
    with pytest.raises(ValueError):
        aggregate([])


def test_drop_missing() -> None:
    y, p, dropped = drop_missing([1, None, 0, float("nan")], [0.9, 0.5, 0.2, 0.4])
    assert y.tolist() == [1.0, 0.0] and p.tolist() == [0.9, 0.2] and dropped == 2


def test_bootstrap_ci_brackets_estimate_and_is_seeded() -> None:
    rng = np.random.RandomState(0)
    y = np.r_[np.zeros(40), np.ones(60)].astype(int)
    p = np.clip(0.5 + 0.25 * (y - 0.5) + 0.2 * rng.randn(100), 0, 1)
    ci = bootstrap_ci(y, p, "auc", n_boot=200, seed=1)
    assert ci.low <= ci.estimate <= ci.high and ci.n_valid == 200
    assert ci == bootstrap_ci(y, p, "auc", n_boot=200, seed=1)
    assert bootstrap_ci(y, p, "sensitivity", n_boot=50).low <= 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(y, p, "kappa")


def test_curves_on_a_grid_match_the_hand_drawn_curves() -> None:
    grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    # ROC: vertical step at FPR 0 to .5, flat to FPR .5, step to 1.
    assert roc_on_grid(Y, P, grid).tolist() == [0.5, 0.5, 1.0, 1.0, 1.0]
    # Interpolated precision: 1 up to recall .5, then 2/3.
    assert pr_on_grid(Y, P, grid) == pytest.approx([1.0, 1.0, 1.0, 2 / 3, 2 / 3])
    # Ties make a diagonal ROC segment: all scores equal -> the chance line.
    assert roc_on_grid([0, 1], [0.5, 0.5], grid) == pytest.approx(grid)


def test_mean_curve_averages_repeats_and_skips_single_class_ones() -> None:
    perfect = ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    roc = mean_curve([(Y, P), perfect, ([1, 1], [0.3, 0.4])], "roc", grid_points=5)
    assert roc.n == 2 and "only one class" in roc.skipped[0]
    assert roc.y_mean.tolist() == pytest.approx([0.75, 0.75, 1.0, 1.0, 1.0])
    assert roc.y_std[0] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    single = mean_curve([perfect], "pr", grid_points=3)
    assert single.n == 1 and np.isnan(single.y_std).all()
    none = mean_curve([([0, 0], [0.2, 0.3])], "pr")
    assert none.n == 0 and np.isnan(none.y_mean).all()


# --------------------------------------------------------------------------- calibration


def _calibrated_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose sigmoid is the true probability of the label: perfectly calibrated."""
    rng = np.random.RandomState(seed)
    z = rng.randn(n) * 2.0
    y = (rng.rand(n) < 1 / (1 + np.exp(-z))).astype(int)
    return z, y


def test_ece_matches_hand_computed_bins() -> None:
    y, p = [0, 1, 1, 1], [0.25, 0.25, 0.85, 0.85]
    # top-label: conf .75 (right 1 of 2) and .85 (right 2 of 2): ECE = .5*.25 + .5*.15.
    data = reliability_data(y, p, n_bins=10)
    assert data.ece == pytest.approx(0.2) and data.mce == pytest.approx(0.25)
    assert data.count.tolist() == [0] * 7 + [2, 2, 0]
    assert data.observed[7] == pytest.approx(0.5) and np.isnan(data.observed[0])
    # positive mode: P(1)=.25 with half positive; .85 with all positive.
    assert expected_calibration_error(y, p, n_bins=10, mode="positive") == pytest.approx(0.5 * 0.25 + 0.5 * 0.15)
    # 2-column probabilities give the same top-label ECE as the 1-D form.
    two = np.stack([1 - np.array(p), np.array(p)], axis=1)
    assert expected_calibration_error(y, two, n_bins=10) == pytest.approx(0.2)
    assert data.to_dict()["observed"][0] is None
    with pytest.raises(ValueError, match="not logits"):
        expected_calibration_error(y, [2.0, 0.1, 0.2, 0.3])


def test_ece_is_small_on_calibrated_predictions() -> None:
    z, y = _calibrated_binary(20000, 0)
    assert expected_calibration_error(y, 1 / (1 + np.exp(-z))) < 0.02


def test_temperature_is_one_on_calibrated_logits() -> None:
    z, y = _calibrated_binary(5000, 1)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.1)


def test_temperature_above_one_for_overconfident_logits_in_every_layout() -> None:
    z, y = _calibrated_binary(5000, 2)
    t_one = fit_temperature(3.0 * z, y)
    assert t_one == pytest.approx(3.0, rel=0.1)
    two_logit = np.stack([np.zeros_like(z), 3.0 * z], axis=1)  # softmax([0, z]) = sigmoid(z)
    assert fit_temperature(two_logit, y) == pytest.approx(t_one, rel=1e-3)
    assert fit_temperature(torch.tensor(3.0 * z)[:, None], torch.tensor(y)) == pytest.approx(t_one, rel=1e-3)

    rng = np.random.RandomState(3)
    logits = rng.randn(4000, 3) * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in probs])
    assert fit_temperature(2.5 * logits, labels) == pytest.approx(2.5, rel=0.1)


def test_temperature_fitted_on_validation_lowers_held_out_ece() -> None:
    z_val, y_val = _calibrated_binary(3000, 4)
    z_test, y_test = _calibrated_binary(3000, 5)
    fit = temperature_fit(4.0 * z_val, y_val)
    assert fit.temperature > 1 and fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    before = expected_calibration_error(y_test, apply_temperature(4.0 * z_test, 1.0))
    after = expected_calibration_error(y_test, apply_temperature(4.0 * z_test, fit.temperature))
    assert after < before / 2
    record = fit.to_dict()
    assert record["method"] == "temperature-scaling" and record["fitted_on"] == "validation"
    assert record["temperature"] == fit.temperature and record["layout"] == "1-logit"
    # Scaling changes no decision: argmax and ranking stay.
    scaled = apply_temperature(np.array([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]]), 3.0)
    assert scaled.argmax(axis=1).tolist() == [0, 1] and scaled.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_undeterminable_temperature_stays_one_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="single class"):
        assert fit_temperature([1.0, 2.0, -0.5], [1, 1, 1]) == 1.0
    with pytest.warns(RuntimeWarning, match="not identifiable"):
        fit = temperature_fit([-3.0, -2.0, 2.0, 4.0], [0, 0, 1, 1])
    assert fit.temperature == 1.0 and "perfectly separated" in fit.note
    z, y = _calibrated_binary(500, 6)
    with pytest.warns(RuntimeWarning, match="upper bound"):
        assert fit_temperature(-z, y) == 1.0  # every ranking reversed: NLL falls towards T -> infinity


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        ([0.1, float("nan")], [0, 1], "NaN or infinite"),
        ([[0.1, 0.2, 0.3]], [3], r"labels must be in \[0, 2\]"),
        ([0.1, 0.2], [0], "labels must have shape"),
        ([], [], "no validation cases"),
        (np.zeros((2, 2, 2)), [0, 1], "logits must have shape"),
    ],
)
def test_bad_calibration_inputs_are_refused(logits: object, labels: object, message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=message):
            fit_temperature(logits, labels)


def test_apply_temperature_refuses_non_positive_t() -> None:
    with pytest.raises(ValueError, match="positive"):
        apply_temperature([0.0, 1.0], 0.0)


# --------------------------------------------------------------------------- reports


def _table1_rows() -> list[RowResult]:
    """The four rows of the acceptance table, with separations in the paper's order."""
    rng = np.random.RandomState(0)
    rows = []
    for name, data, sep in (
        ("3D CNN", "FS-MRI", 2.0),
        ("NE-only baseline", "NE-MRI", 0.6),
        ("PromptNet (fixed weight)", "NE-MRI", 0.9),
        ("Adaptive PromptNet", "NE-MRI", 1.2),
    ):
        repeats = []
        for _ in range(5):
            y = np.r_[np.zeros(15), np.ones(59)].astype(int)
            z = rng.randn(74) + sep * (2 * y - 1) + 1.0
            repeats.append((y, 1 / (1 + np.exp(-z))))
        rows.append(RowResult(name, data, tuple(repeats)))
    return rows


def test_table1_markdown_and_csv_have_the_papers_columns() -> None:
    rows = [
        RowResult("3D CNN", "FS-MRI", ((Y, P), ([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8]))),
        RowResult("Adaptive PromptNet", "NE-MRI", ((Y, P), (Y, P))),
    ]
    table = table1(rows)
    md = table.to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| Type | Data | AUC | PRC | Accuracy | Precision | Sensitivity | Specificity | F1 |"
    # AUC .75 and 1.0: mean .875, sample std .1768; identical repeats: std 0.
    assert lines[2].startswith("| 3D CNN | FS-MRI | 0.8750±0.1768 | ")
    assert lines[3].startswith("| Adaptive PromptNet | NE-MRI | 0.7500±0.0000 | 0.8333±0.0000 | 0.7500±0.0000 |")
    assert "ddof=1" in md and "2 repeats" in md

    parsed = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert list(parsed[0])[: len(TABLE1_COLUMNS)] == list(TABLE1_COLUMNS)
    assert parsed[0]["AUC"] == "0.8750±0.1768"
    assert float(parsed[0]["AUC_mean"]) == pytest.approx(0.875)
    assert float(parsed[0]["AUC_std"]) == pytest.approx(0.1767767)
    assert parsed[1]["Type"] == "Adaptive PromptNet" and parsed[1]["AUC_n"] == "2"


def test_table_handles_undefined_repeats_and_escapes_pipes() -> None:
    rows = [RowResult("A | B", "NE-MRI", ((Y, P), ([1, 1], [0.7, 0.9])))]
    md = table1(rows).to_markdown()
    assert "A \\| B" in md
    assert "| 0.7500 |" in md  # only one defined AUC: mean alone
    assert "left out where undefined" in md


def test_write_report_renders_every_file(tmp_path: Path) -> None:
    rows = _table1_rows()
    files = write_report(rows, tmp_path / "report", title="Table 1 (synthetic)")
    md = files.markdown.read_text(encoding="utf-8")
    for name in ("3D CNN | FS-MRI", "NE-only baseline | NE-MRI", "PromptNet (fixed weight) | NE-MRI",
                 "Adaptive PromptNet | NE-MRI"):
        assert f"| {name} | " in md
    assert "5 repeats" in md
    assert files.csv.read_text(encoding="utf-8").startswith("Type,Data,AUC,PRC,Accuracy,Precision,Sensitivity")
    for png in (files.roc_pr, files.reliability):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05, "figure should not be blank"
    roc_pr = imread(files.roc_pr)
    assert roc_pr.shape[1] > 1.5 * roc_pr.shape[0], "two panels side by side"
    again = load_predictions(files.predictions)
    assert [r.name for r in again] == [r.name for r in rows]
    assert table1(again).to_markdown() == md


def test_figures_cope_with_one_repeat_and_single_class_repeats(tmp_path: Path) -> None:
    rows = [
        RowResult("one repeat", "NE-MRI", ((Y, P),)),
        RowResult("with a one-class repeat", "FS-MRI", ((Y, P), ([1, 1], [0.6, 0.7]))),
    ]
    out = save_roc_pr_figure(rows, tmp_path / "curves.png")
    assert out.exists() and out.stat().st_size > 10_000
    save_reliability_diagram({"x": reliability_data(Y, P)}, tmp_path / "rel.png")
    assert (tmp_path / "rel.png").exists()


def test_predictions_round_trip_with_case_ids(tmp_path: Path) -> None:
    row = RowResult("m", "NE-MRI", ((Y, P),), case_ids=(("a", "b", "c", "d"),))
    path = save_predictions([row], tmp_path / "pred.json")
    (back,) = load_predictions(path)
    assert back.case_ids == (("a", "b", "c", "d"),)
    assert back.repeats[0][1].tolist() == P
    with pytest.raises(ValueError, match="case_ids"):
        RowResult("m", "NE-MRI", ((Y, P),), case_ids=(("a",),))
    with pytest.raises(ValueError, match="no repeats"):
        RowResult("m", "NE-MRI", ())
    (tmp_path / "junk.json").write_text("[]")
    with pytest.raises(ValueError, match="not a predictions file"):
        load_predictions(tmp_path / "junk.json")


def test_multitask_table_for_mmdlm() -> None:
    grade = [(Y, P), ([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.8])]
    idh = [([0, None, 1, 1, 0], [0.2, 0.9, 0.6, 0.7, 0.1])]  # the unlabelled case is left out -> AUC 1
    codel = [([0, 0, 0, None], [0.3, 0.4, 0.2, 0.9])]  # no positives -> undefined
    table = multitask_table([MultiTaskRow("MMDLM", "T2+FLAIR+T1CE", {"grade": grade, "idh": idh, "1p19q": codel})])
    md = table.to_markdown()
    assert md.splitlines()[0] == "| Model | Data | Grade AUC | IDH AUC | 1p/19q AUC |"
    assert md.splitlines()[2] == "| MMDLM | T2+FLAIR+T1CE | 0.8750±0.1768 | 1.0000 | n/a |"
    assert "left out of that task (2 case-evaluations)" in md
    parsed = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert parsed[0]["IDH AUC_mean"] == "1.0" and parsed[0]["1p/19q AUC_mean"] == ""
    with pytest.raises(ValueError, match="not among"):
        multitask_table([MultiTaskRow("x", "y", {"mgmt": grade})])
