"""Paired AUC comparisons (training.metrics, training.reports) and their tables in the protocols' reports.

The bootstrap is checked where the truth is known: identical models (difference 0), a clearly
better model, the interval's coverage over simulated datasets with a known true difference, the
gain from pairing, and the reason for sharing case weights across overlapping test parts. Then the
tables, and ``write_results`` / ``evaluate`` on hand-written result files (no training).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training import cli
from training.metrics import (
    PairedRepeat,
    delong_paired,
    design_detectable_difference,
    hanley_mcneil_se,
    pair_predictions,
    paired_auc_difference,
    pooled_auc_ci,
    smallest_detectable_difference,
    weighted_auc,
)
from training.protocols import crossmodal
from training.protocols import promptnet as proto
from training.reports import (
    RowResult,
    ablation_row,
    ablation_table,
    compare_rows,
    comparison_table,
    save_predictions,
)

PHI = NormalDist().cdf


def _sim(rng: np.random.RandomState, n_neg: int, n_pos: int, mu_a: float, mu_b: float, rho: float = 0.5,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binormal scores of two models on the same cases; their case noise correlates by ``rho``.

    With unit variances the population AUC of a model with separation mu is Phi(mu / sqrt 2).
    """
    y = np.r_[np.zeros(n_neg), np.ones(n_pos)].astype(int)
    e = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=len(y))
    return y, 1 / (1 + np.exp(-(mu_a * y + e[:, 0]))), 1 / (1 + np.exp(-(mu_b * y + e[:, 1])))


def _repeats(rng: np.random.RandomState, n: int, n_neg: int, n_pos: int, mu_a: float, mu_b: float,
             rho: float = 0.5) -> list[PairedRepeat]:
    return [PairedRepeat(tuple(f"{k}-{i}" for i in range(n_neg + n_pos)), *_sim(rng, n_neg, n_pos, mu_a, mu_b, rho),
                         repeat=k) for k in range(n)]


# ----------------------------------------------------------------------------- the AUC core


def test_weighted_auc_equals_sklearn_with_ties_and_with_integer_weights() -> None:
    rng = np.random.RandomState(0)
    y = np.r_[np.zeros(9), np.ones(21)].astype(int)
    p = np.round(rng.rand(30), 1)  # many ties
    assert weighted_auc(y, p, np.ones((1, 30)))[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    counts = rng.randint(0, 4, size=(5, 30))
    counts[:, 0] = counts[:, -1] = 1  # both classes present
    expected = [roc_auc_score(np.repeat(y, c), np.repeat(p, c)) for c in counts]
    assert weighted_auc(y, p, counts) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(weighted_auc(y, p, np.r_[np.zeros(9), np.ones(21)][None, :])[0])  # no negative weight


def test_delong_matches_the_bootstrap_on_one_test_part() -> None:
    y, pa, pb = _sim(np.random.RandomState(5), 15, 59, 2.0, 1.5)
    rep = PairedRepeat(tuple(map(str, range(74))), y, pa, pb)
    boot = paired_auc_difference([rep], n_boot=4000, scheme="stratified")
    dl = boot.delong[0]
    assert dl.difference == pytest.approx(boot.estimate, abs=1e-12)
    assert dl.se == pytest.approx(boot.se, rel=0.15)
    assert delong_paired(y, pa, pa).p_value == 1.0
    # at AUC 0.5 Hanley-McNeil is the exact Mann-Whitney null variance (n1 + n0 + 1) / (12 n1 n0)
    assert hanley_mcneil_se(0.5, 20, 10) == pytest.approx(math.sqrt(31 / (12 * 200)))


# ----------------------------------------------------------------------------- the paired bootstrap


@pytest.mark.parametrize("scheme", ["shared", "stratified"])
def test_identical_models_differ_by_zero_and_are_not_distinguishable(scheme: str) -> None:
    rng = np.random.RandomState(1)
    reps = [PairedRepeat(r.case_ids, r.y, r.p_a, r.p_a, r.repeat) for r in _repeats(rng, 5, 15, 59, 1.5, 1.5)]
    d = paired_auc_difference(reps, scheme=scheme)  # type: ignore[arg-type]
    assert d.per_repeat == (0.0,) * 5 and d.estimate == 0.0
    assert d.low == 0.0 == d.high and d.p_value == 1.0
    assert d.verdict == "not distinguishable"


def test_a_clearly_better_model_is_higher_and_the_reverse_lower() -> None:
    reps = _repeats(np.random.RandomState(2), 5, 15, 59, 3.0, 0.5)
    d = paired_auc_difference(reps)
    assert d.low > 0 and d.verdict == "higher" and d.p_value < 0.01
    flipped = paired_auc_difference([PairedRepeat(r.case_ids, r.y, r.p_b, r.p_a, r.repeat) for r in reps])
    assert flipped.estimate == pytest.approx(-d.estimate) and flipped.verdict == "lower"
    again = paired_auc_difference(reps)
    assert (again.low, again.high, again.p_value) == (d.low, d.high, d.p_value)  # seeded


def _coverage(scheme: str, *, overlap: bool, n_sets: int = 200) -> float:
    """Share of simulated datasets whose 95 % interval holds the known population difference."""
    mu_a, mu_b = 2.0, 1.5
    truth = PHI(mu_a / math.sqrt(2)) - PHI(mu_b / math.sqrt(2))
    rng = np.random.RandomState(0)
    hits = 0
    for k in range(n_sets):
        if overlap:  # three repeats that test the same 40 cases with the same models
            y, pa, pb = _sim(rng, 8, 32, mu_a, mu_b)
            reps = [PairedRepeat(tuple(map(str, range(40))), y, pa, pb, r) for r in range(3)]
        else:
            reps = _repeats(rng, 3, 8, 32, mu_a, mu_b)
        d = paired_auc_difference(reps, n_boot=400, seed=k, scheme=scheme, delong=False)  # type: ignore[arg-type]
        hits += d.low <= truth <= d.high
    return hits / n_sets


@pytest.mark.parametrize("scheme", ["shared", "stratified"])
def test_the_95_percent_interval_covers_a_known_difference(scheme: str) -> None:
    # measured: 0.94 (shared) and 0.96 (stratified); the binomial SE of 200 sets is ~0.017
    assert 0.88 <= _coverage(scheme, overlap=False) <= 0.99


def test_cases_shared_by_repeats_get_one_weight_else_the_interval_is_too_narrow() -> None:
    # repeats that test the same cases are one piece of evidence, not three: resampling each repeat
    # on its own covers the truth far too rarely (measured 0.62), shared case weights do not (0.87)
    assert _coverage("shared", overlap=True) >= 0.85
    assert _coverage("stratified", overlap=True) <= 0.75


def test_pairing_narrows_the_interval_when_models_share_case_noise() -> None:
    # most of the case-to-case noise is common to both models (rho 0.9): the paired difference is
    # resolved while the two rows' separate intervals overlap
    reps = _repeats(np.random.RandomState(3), 5, 15, 59, 1.5, 1.2, rho=0.9)
    paired = paired_auc_difference(reps)
    a = pooled_auc_ci([(r.case_ids, r.y, r.p_a) for r in reps])
    b = pooled_auc_ci([(r.case_ids, r.y, r.p_b) for r in reps], seed=1)
    unpaired_se = math.hypot(a.se, b.se)
    assert paired.se < 0.5 * unpaired_se
    assert a.estimate - b.estimate == pytest.approx(paired.estimate)
    assert paired.verdict == "higher"
    assert abs(paired.estimate) < 1.96 * unpaired_se  # an unpaired test would call it indistinguishable
    assert a.low < a.estimate < a.high and b.low < b.high and a.low < b.high  # the rows' CIs overlap


def test_smallest_detectable_difference_and_planning() -> None:
    assert smallest_detectable_difference(0.01) == pytest.approx(0.0196, abs=1e-4)
    assert smallest_detectable_difference(0.01, power=0.8) == pytest.approx(0.0280, abs=1e-4)
    reps = _repeats(np.random.RandomState(4), 5, 15, 59, 2.0, 1.6)
    d = paired_auc_difference(reps)
    assert d.smallest_detectable() == pytest.approx(1.959964 * d.se, rel=1e-6)
    # planning: more distinct test cases resolve smaller differences; correlated models too
    small = design_detectable_difference(0.92, 0.945, 59, 15)
    large = design_detectable_difference(0.92, 0.945, 293, 76)
    assert large < small and large == pytest.approx(small / math.sqrt(369 / 74), rel=0.1)
    assert design_detectable_difference(0.92, 0.945, 293, 76, correlation=0.7) < large


def test_repeats_without_two_cases_of_each_class_are_left_out_with_a_reason() -> None:
    good = _repeats(np.random.RandomState(6), 2, 6, 14, 2.0, 1.0)
    one_class = PairedRepeat(("a", "b", "c"), np.array([1, 1, 1]), np.array([.6, .7, .8]), np.array([.5, .6, .9]), 7)
    single = PairedRepeat(("a", "b", "c"), np.array([0, 1, 1]), np.array([.1, .7, .8]), np.array([.9, .6, .5]), 8)
    d = paired_auc_difference([*good, one_class, single])
    assert d.repeats == (0, 1) and len(d.notes) == 2
    assert "only class 1" in d.notes[0] and "single case of class 0" in d.notes[1]
    none = paired_auc_difference([single])
    assert none.verdict == "undefined" and math.isnan(none.estimate)
    assert "undefined" in comparison_table([compare_rows(
        RowResult("A", "", ((single.y, single.p_a),), (single.case_ids,)),
        RowResult("B", "", ((single.y, single.p_b),), (single.case_ids,)))]).to_markdown()


def test_pairing_aligns_cases_by_id_and_refuses_other_cases() -> None:
    pair = pair_predictions(["a", "b", "c"], [0, 1, 1], [.1, .8, .9], ["c", "a", "b"], [1, 0, 1], [.7, .2, .6])
    assert pair.case_ids == ("a", "b", "c") and pair.p_b.tolist() == [.2, .6, .7]
    with pytest.raises(ValueError, match="not tested on the same cases"):
        pair_predictions(["a", "b"], [0, 1], [.1, .9], ["a", "x"], [0, 1], [.2, .8])
    with pytest.raises(ValueError, match="labels disagree"):
        pair_predictions(["a", "b"], [0, 1], [.1, .9], ["a", "b"], [1, 0], [.2, .8])
    with pytest.raises(ValueError, match="same labels"):
        pair_predictions(None, [0, 1], [.1, .9], None, [1, 0], [.2, .8])


# ----------------------------------------------------------------------------- tables


def _rows(rng: np.random.RandomState, n_rep: int = 3) -> dict[str, RowResult]:
    """Three NE rows on the same test parts: fixed = the baseline's predictions, adaptive far better."""
    ids = tuple(tuple(f"c{i}" for i in rng.choice(100, 40, replace=False)) for _ in range(n_rep))
    ys, base, good = [], [], []
    for _ in range(n_rep):
        y, pa, pb = _sim(rng, 10, 30, 3.0, 0.7)
        ys.append(y), good.append(pa), base.append(pb)
    return {
        "none": RowResult("NE-only baseline", "NE-MRI", tuple(zip(ys, base)), ids),
        "fixed": RowResult("PromptNet (fixed weight)", "NE-MRI", tuple(zip(ys, base)), ids),
        "adaptive": RowResult("Adaptive PromptNet", "NE-MRI", tuple(zip(ys, good)), ids),
    }


def test_comparison_table_text_and_csv() -> None:
    rows = _rows(np.random.RandomState(7))
    comps = [compare_rows(rows["adaptive"], rows["none"]), compare_rows(rows["fixed"], rows["none"])]
    table = comparison_table(comps)
    md = table.to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| Comparison (A − B) | r0 | r1 | r2 | Mean | 95 % CI | p | Detectable | Verdict |"
    assert lines[2].startswith("| Adaptive PromptNet − NE-only baseline | +") and lines[2].endswith("| higher |")
    assert lines[3] == ("| PromptNet (fixed weight) − NE-only baseline | +0.000 | +0.000 | +0.000 | +0.000 | "
                        "[+0.000, +0.000] | 1.000 | – | not distinguishable |")
    assert "<0.001" in lines[2]
    assert "Test parts: 40 cases (10 LGG) per repeat, 3 repeats" in md
    assert "not distinguishable\" when it holds 0" in md
    parsed = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [r["verdict"] for r in parsed] == ["higher", "not distinguishable"]
    assert float(parsed[0]["estimate"]) == pytest.approx(comps[0].result.estimate)
    assert float(parsed[0]["ci_low"]) > 0 and parsed[0]["kind"] == "difference"
    assert float(parsed[1]["delong_p_r0"]) == 1.0 and parsed[0]["n_negative"] == "10;10;10"


def test_ablation_table_has_rows_with_pooled_ci_and_the_differences() -> None:
    rows = _rows(np.random.RandomState(8))
    abl = [ablation_row(s, rows[k]) for s, k in (("Without prompt loss", "none"), ("Adaptive", "adaptive"))]
    table = ablation_table(abl, [compare_rows(rows["adaptive"], rows["none"])])
    md = table.to_markdown()
    assert md.splitlines()[0] == "| Setting | Model | AUC (mean ± sd) | Pooled AUC [95 % CI] |"
    assert "| Without prompt loss | NE-only baseline | " in md and "| Comparison (A − B) |" in md
    parsed = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [r["kind"] for r in parsed] == ["row", "row", "difference"]
    assert float(parsed[0]["ci_low"]) < float(parsed[0]["estimate"]) < float(parsed[0]["ci_high"])
    assert float(parsed[1]["auc_mean"]) == pytest.approx(rows["adaptive"].summary()["auc"].mean)


# ----------------------------------------------------------------------------- the protocols' reports


def _record(row: str, k: int, ids: tuple[str, ...], y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """A results/<row>-r<k>.json as the PromptNet protocol writes it (the fields write_results reads)."""
    return {
        "row": row, "repeat": k, "best_epoch": 3, "epochs_run": 5, "train_seconds": 1.0,
        "epoch_seconds_mean": 0.2, "samples_per_s_mean": 10.0, "calibration": {"temperature": 1.0},
        "val": {"metrics": {"auc": 0.8}},
        "test": {"case_ids": list(ids), "y": y.tolist(), "p": p.tolist(), "p_calibrated": p.tolist(),
                 "metrics": {"auc": float(roc_auc_score(y, p))}, "ece": 0.1, "ece_calibrated": 0.05},
    }


@pytest.fixture()
def promptnet_run(tmp_path: Path) -> Path:
    """A PromptNet run folder with hand-written results: FS near perfect, adaptive clearly above the
    baseline, fixed = the baseline's predictions; adaptive finished only repeats 0 and 1 of 0-2."""
    rng = np.random.RandomState(9)
    out = tmp_path / "run"
    config = {"split": {"kfold": 0}, "protocol": {"departures": ["hand-written results"]}}
    (out / "results").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"protocol": "promptnet", "config": config, "rows": None}))
    for k in range(3):
        ids = tuple(f"BraTS_{i:03d}" for i in rng.choice(200, 40, replace=False))
        y, p_fs, p_ne = _sim(rng, 10, 30, 4.0, 0.7)
        _, p_ad, _ = _sim(rng, 10, 30, 3.0, 0.7)
        order = rng.permutation(40)  # rows list their cases in different orders
        for row, p in (("fs", p_fs), ("none", p_ne), ("fixed", p_ne), ("adaptive", p_ad)):
            if row == "adaptive" and k == 2:
                continue
            idx = order if row == "fixed" else np.arange(40)
            rec = _record(row, k, tuple(ids[i] for i in idx), y[idx], p[idx])
            (out / "results" / f"{row}-r{k}.json").write_text(json.dumps(rec))
    return out


def _verdicts(md: str) -> dict[str, str]:
    return {cells[1].strip(): cells[-2].strip() for cells in (line.split("|") for line in md.splitlines())
            if len(cells) > 3 and " − " in cells[1] and not cells[1].startswith(" Comparison")}


def test_write_results_writes_comparisons_and_table2_with_the_expected_verdicts(promptnet_run: Path) -> None:
    summary = proto.write_results(promptnet_run, json.loads((promptnet_run / "run.json").read_text())["config"])
    rep = promptnet_run / "report"
    t1 = (rep / "table1_comparisons.md").read_text(encoding="utf-8")
    verdicts = _verdicts(t1)
    assert list(verdicts) == ["PromptNet (fixed weight) − NE-only baseline", "Adaptive PromptNet − NE-only baseline",
                              "3D CNN (FS-MRI) − NE-only baseline", "Adaptive PromptNet − PromptNet (fixed weight)",
                              "3D CNN (FS-MRI) − Adaptive PromptNet"]
    assert verdicts["PromptNet (fixed weight) − NE-only baseline"] == "not distinguishable"
    assert verdicts["Adaptive PromptNet − NE-only baseline"] == "higher"
    assert verdicts["3D CNN (FS-MRI) − NE-only baseline"] == "higher"
    assert verdicts["Adaptive PromptNet − PromptNet (fixed weight)"] == "higher"
    adaptive = next(c for c in summary["comparisons"]["table1"] if c["comparison"].startswith("Adaptive PromptNet − NE"))
    assert adaptive["repeats"] == [0, 1]  # only the repeats both rows finished
    fixed = next(c for c in summary["comparisons"]["table1"] if c["a"] == "PromptNet (fixed weight)")
    assert fixed["repeats"] == [0, 1, 2] and fixed["per_repeat"] == [0.0, 0.0, 0.0]  # paired by id, not by order
    t2 = (rep / "table2.md").read_text(encoding="utf-8")
    for setting in ("Without prompt loss", "Fixed prompt weight", "Adaptive prompt weight"):
        assert f"| {setting} | " in t2
    assert _verdicts(t2) == {"PromptNet (fixed weight) − NE-only baseline": "not distinguishable",
                             "Adaptive PromptNet − NE-only baseline": "higher",
                             "Adaptive PromptNet − PromptNet (fixed weight)": "higher"}
    assert (rep / "table2.csv").read_text(encoding="utf-8").startswith("kind,name,")
    saved = json.loads((rep / "summary.json").read_text())
    assert saved["comparisons_markdown"] == t1 and saved["table2_markdown"] == t2
    t2_rows = saved["comparisons"]["table2"]["rows"]
    assert [r["setting"] for r in t2_rows] == ["Without prompt loss", "Fixed prompt weight", "Adaptive prompt weight"]
    # the same predictions listed in another order get the same interval (weights follow case ids)
    assert t2_rows[0]["pooled"]["low"] == t2_rows[1]["pooled"]["low"] < t2_rows[0]["pooled"]["estimate"]
    assert saved["files"]["table2_csv"].endswith("table2.csv")
    assert "table1_comparisons.md and table2.md" in (rep / "table1.md").read_text(encoding="utf-8")


def test_cli_evaluate_prints_table1_then_the_comparisons_and_table2(
        promptnet_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", str(promptnet_run)]) == 0
    out = capsys.readouterr().out
    assert out.index("| Type | Data | AUC") < out.index("Paired differences") < out.index("Table 2: ablation")
    assert "| Adaptive PromptNet − NE-only baseline |" in out


def test_crossmodal_evaluate_compares_each_stage_and_the_final_model(tmp_path: Path) -> None:
    rng = np.random.RandomState(10)
    reps: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"t1ce": [], "flair": [], "final": []}
    ids = []
    for _ in range(3):
        ids.append(tuple(f"c{i}" for i in rng.choice(100, 40, replace=False)))
        y, p_final, p_t1ce = _sim(rng, 10, 30, 3.0, 0.8)
        reps["t1ce"].append((y, p_t1ce)), reps["flair"].append((y, p_t1ce)), reps["final"].append((y, p_final))
    rows = [RowResult("Primary only (stage 1)", "T1CE", tuple(reps["t1ce"]), tuple(ids)),
            RowResult("Stage 2 with +FLAIR only", "T1CE+FLAIR", tuple(reps["flair"]), tuple(ids)),
            RowResult("Cross-modality guidance", "FS-MRI", tuple(reps["final"]), tuple(ids))]
    save_predictions(rows, tmp_path / "report" / "table1_predictions.json")
    summary = crossmodal.evaluate(tmp_path)
    assert _verdicts(summary["comparisons_markdown"]) == {
        "Stage 2 with +FLAIR only − Primary only (stage 1)": "not distinguishable",
        "Cross-modality guidance − Stage 2 with +FLAIR only": "higher",
        "Cross-modality guidance − Primary only (stage 1)": "higher",
    }
    assert (tmp_path / "report" / "table1_comparisons.csv").exists()
    assert [c["verdict"] for c in summary["comparisons"]] == ["not distinguishable", "higher", "higher"]
