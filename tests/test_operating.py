"""The operating threshold: chosen on validation (Youden's J), stored in the checkpoint, used by the node.

Why these tests: labelling by argmax on an imbalanced cohort calls every case HGG (held-out
specificity 0.00) and the floor withholds the model. The threshold must come from validation
data, travel inside the checkpoint (hashed and validated), and be the one rule the node labels
with, while the held-out figures the floor reads are counted at that same threshold.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from checkpoints import hparams_for, spec_for
from dicomnode.handoff import TaskResult
from dicomnode.stages.infer import ModelCache, calibrate, floor_threshold_mismatch, run_model, withhold_under_floor
from models.checkpoint import CheckpointError, content_hash, load_checkpoint, read_header, save_checkpoint
from models.families import get_family
from models.gate import FloorSettings
from models.preprocess import apply_spec
from models.registry import CheckpointRegistry
from training.metrics import binary_metrics, bootstrap_ci
from training.operating import THRESHOLD_RULE, heldout_metrics, youden_threshold

ROLES4 = ["T1", "T1CE", "T2", "FLAIR"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- Youden's J


def brute_force_youden(y: np.ndarray, p: np.ndarray) -> tuple[float, list[float]]:
    """Best J over every way of cutting the sorted validation scores, and the midpoints that reach it.

    Independent of the module: counts each cut's confusion matrix case by case.
    """
    values = sorted(set(p.tolist()))
    results = []
    for a, b in zip(values[:-1], values[1:]):
        cut = (a + b) / 2
        tp = sum(1 for yi, pi in zip(y, p) if yi == 1 and pi >= cut)
        tn = sum(1 for yi, pi in zip(y, p) if yi == 0 and pi < cut)
        j = tp / sum(y == 1) + tn / sum(y == 0) - 1
        results.append((j, cut))
    best = max(j for j, _ in results)
    return best, [c for j, c in results if math.isclose(j, best, abs_tol=1e-12)]


def test_youden_hand_made_answer() -> None:
    # cut at 0.5 (between 0.4 and 0.6): sens 4/4, spec 2/3, J 0.667;
    # cut at 0.75 (between 0.7 and 0.8): sens 3/4, spec 3/3, J 0.75 -> the best
    y = [0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.4, 0.7, 0.6, 0.8, 0.9, 0.95]
    assert youden_threshold(y, p) == pytest.approx(0.75)


def test_youden_on_an_imbalanced_validation_part_moves_the_cut_above_argmax() -> None:
    # the shape: every case has P(HGG) > 0.5, so argmax calls all HGG (spec 0)
    y = np.array([0, 0, 0] + [1] * 7)
    p = np.array([0.55, 0.60, 0.62, 0.70, 0.72, 0.75, 0.80, 0.85, 0.90, 0.95])
    assert binary_metrics(y, p, 0.5).specificity == 0.0
    t = youden_threshold(y, p)
    assert t == pytest.approx(0.66)
    m = binary_metrics(y, p, t)
    assert (m.sensitivity, m.specificity) == (1.0, 1.0)


def test_youden_agrees_with_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(2, 25))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        # rounded scores: many ties between cases, which is where cut placement is easy to get wrong
        p = np.round(rng.random(n) * 0.6 + 0.4 * y * rng.random(n), int(rng.integers(1, 3)))
        p = np.clip(p, 0, 1)
        if len(set(p.tolist())) < 2:
            continue
        best, cuts = brute_force_youden(y, p)
        t = youden_threshold(y, p)
        if best <= 0:
            assert t == 0.5
        else:
            nearest = min(abs(c - 0.5) for c in cuts)
            assert t == pytest.approx(min(c for c in cuts if abs(abs(c - 0.5) - nearest) < 1e-12))
            m = binary_metrics(y, p, t)
            assert m.sensitivity + m.specificity - 1 == pytest.approx(best)
        checked += 1
    assert checked > 200


def test_youden_ties_go_to_the_cut_nearest_half_then_the_lower() -> None:
    # cuts 0.15 (sens 1, spec 1/2) and 0.35 (sens 1/2, spec 1) both give J = 0.5: 0.35 is nearer 0.5
    assert youden_threshold([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.35)
    # the mirror image: cuts 0.65 and 0.85 tie; 0.65 is nearer
    assert youden_threshold([0, 1, 0, 1], [0.6, 0.7, 0.8, 0.9]) == pytest.approx(0.65)
    # symmetric about 0.5 (cuts 0.35 and 0.65, equally far): the lower one, deterministically
    assert youden_threshold([0, 1, 0, 1], [0.3, 0.4, 0.6, 0.7]) == pytest.approx(0.35)


def test_youden_cuts_between_scores_never_on_one() -> None:
    y = [0, 0, 1, 1, 1]
    p = [0.2, 0.2, 0.6, 0.6, 0.9]  # tied scores within each class
    t = youden_threshold(y, p)
    assert t == pytest.approx(0.4) and t not in p
    # scores a few ULPs apart: the cut still separates them
    a = 0.3
    b = float(np.nextafter(a, 1.0))
    t = youden_threshold([0, 1], [a, b])
    assert a < t <= b and binary_metrics([0, 1], [a, b], t).accuracy == 1.0


def test_youden_falls_back_to_half_when_validation_cannot_choose() -> None:
    assert youden_threshold([], []) == 0.5
    assert youden_threshold([1, 1, 1], [0.2, 0.6, 0.9]) == 0.5  # one class
    assert youden_threshold([0, 0], [0.2, 0.9]) == 0.5
    assert youden_threshold([0, 1], [0.4, 0.4]) == 0.5  # one distinct score: no cut exists
    assert youden_threshold([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.5  # reversed: no cut beats chance
    with pytest.raises(ValueError, match="logits"):
        youden_threshold([0, 1], [-1.0, 2.0])
    with pytest.raises(ValueError, match="0 and 1"):
        youden_threshold([0, 2], [0.1, 0.9])


# --------------------------------------------------------------------------- held-out metrics


def test_heldout_metrics_measure_both_parts_at_the_validation_threshold() -> None:
    rng = np.random.default_rng(3)
    y_val = np.array([0] * 6 + [1] * 18)
    p_val = np.clip(0.6 + 0.25 * y_val + rng.normal(0, 0.08, y_val.size), 0, 1)
    y_test = np.array([0] * 5 + [1] * 15)
    p_test = np.clip(0.6 + 0.25 * y_test + rng.normal(0, 0.08, y_test.size), 0, 1)
    val, test, t = heldout_metrics(y_val, p_val, y_test, p_test, n_boot=300, seed=1)
    assert t == youden_threshold(y_val, p_val) and t != 0.5
    for part, (y, p) in ((val, (y_val, p_val)), (test, (y_test, p_test))):
        ref = binary_metrics(y, p, threshold=t).as_dict()
        for key in ("auc", "sensitivity", "specificity", "accuracy", "tp", "fp", "tn", "fn", "n"):
            assert part[key] == ref[key], key
        assert part["threshold"] == t and part["threshold_rule"] == THRESHOLD_RULE == "youden_val"
    assert test["n"] == 20
    ci = bootstrap_ci(y_test, p_test, "auc", n_boot=300, seed=1, threshold=t)
    assert test["auc_ci"] == [ci.low, ci.high] and ci.low <= test["auc"] <= ci.high
    assert test["auc_ci_level"] == 0.95 and test["auc_ci_n_boot"] == 300
    assert "auc_ci" not in val  # the interval is a held-out figure only


def test_heldout_metrics_undefined_values_are_none_not_nan() -> None:
    val, test, t = heldout_metrics([0, 1, 0, 1], [0.2, 0.8, 0.3, 0.9], [1, 1, 1], [0.6, 0.7, 0.9], n_boot=50)
    assert t == pytest.approx(0.55)
    assert test["auc"] is None and test["specificity"] is None and test["auc_ci"] == [None, None]
    assert test["sensitivity"] == 1.0 and any("auc" in n for n in test["notes"])
    # no validation part: nothing to choose with, so 0.5; the empty part says n = 0
    val, test, t = heldout_metrics([], [], [0, 1], [0.4, 0.6], n_boot=50)
    assert t == 0.5 and val == {"n": 0, "threshold": 0.5, "threshold_rule": "youden_val"}
    assert test["accuracy"] == 1.0


# --------------------------------------------------------------------------- the checkpoint


def _fs3d_model(p_hgg: float) -> torch.nn.Module:
    """The real 3D CNN family, built tiny, whose last layer says P(HGG) = ``p_hgg`` whatever the input.

    Why: the node test needs a case with a known probability between the stored threshold and 0.5;
    only the final layer is set, the network and its checkpoint are otherwise the family's own.
    """
    torch.manual_seed(0)
    model = get_family("fs3dcnn").build(hparams_for("fs3dcnn"))
    last = model.classifier.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, math.log(p_hgg / (1 - p_hgg))]))
    return model.eval()


def _save_fs3d(path: Path, p_hgg: float, *, thresholds: dict[str, float] | None, temperature: float | None = None,
               metrics: dict[str, Any] | None = None) -> str:
    return save_checkpoint(path, _fs3d_model(p_hgg), "fs3dcnn", hparams_for("fs3dcnn"), spec_for("fs3dcnn"),
                           training_data={"description": "test"}, metrics=metrics or {"note": "test"},
                           temperature=temperature, thresholds=thresholds)


def test_checkpoint_round_trip_with_thresholds_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "with.pt"
    digest = _save_fs3d(path, 0.4, thresholds={"grade": 0.3})
    loaded = load_checkpoint(path)
    assert loaded.thresholds == {"grade": 0.3} and loaded.sha256 == digest
    assert read_header(path)["thresholds"] == {"grade": 0.3}
    # the threshold is hashed: edited after writing, the file is refused
    payload = torch.load(path, weights_only=True)
    payload["thresholds"] = {"grade": 0.9}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(path)
    # removed after writing: also a different hash
    del payload["thresholds"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        load_checkpoint(path)


def test_checkpoint_without_thresholds_loads_with_none(tmp_path: Path) -> None:
    new = tmp_path / "none.pt"
    _save_fs3d(new, 0.4, thresholds=None)
    assert load_checkpoint(new).thresholds == {}
    # a format-1 file, written before thresholds existed: no field at all, its own (old) hash
    old = tmp_path / "old.pt"
    payload = torch.load(new, weights_only=True)
    del payload["thresholds"]
    payload["format_version"] = 1
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "sha256")}
    payload["sha256"] = content_hash(payload["state_dict"], meta)
    torch.save(payload, old)
    loaded = load_checkpoint(old)
    assert loaded.thresholds == {} and loaded.sha256 == payload["sha256"]


@pytest.mark.parametrize("bad, message", [
    ({"grade": 0.0}, "strictly between 0 and 1"), ({"grade": 1.0}, "strictly between 0 and 1"),
    ({"grade": float("nan")}, "strictly between 0 and 1"), ({"grade": True}, "strictly between 0 and 1"),
    ({"grade": "0.4"}, "strictly between 0 and 1"), ({"idh": 0.4}, "not a task of the fs3dcnn family"),
])
def test_checkpoint_refuses_bad_thresholds(tmp_path: Path, bad: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        _save_fs3d(tmp_path / "bad.pt", 0.4, thresholds=bad)
    assert not (tmp_path / "bad.pt").exists()
    # and on load, for a file that was hashed consistently with a bad value
    good = tmp_path / "good.pt"
    _save_fs3d(good, 0.4, thresholds={"grade": 0.3})
    payload = torch.load(good, weights_only=True)
    payload["thresholds"] = bad
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "sha256")}
    payload["sha256"] = content_hash(payload["state_dict"], meta)
    torch.save(payload, good)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(good)


# --------------------------------------------------------------------------- the node


@pytest.fixture(scope="module")
def fs3d_case() -> Any:
    rng = np.random.default_rng(0)
    spacing = 6.0
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -96.0
    volumes = {r: (rng.normal(100, 20, (32, 32, 32)).astype(np.float32), affine) for r in ROLES4}
    return apply_spec(spec_for("fs3dcnn"), volumes)


def _run(folder: Path, case: Any, floor: FloorSettings | None = None) -> Any:
    (sel,) = CheckpointRegistry(folder).select(ROLES4)
    return run_model(sel, case, {}, ModelCache(), device="cpu", floor=floor)


@pytest.mark.parametrize("p_hgg, threshold, expected", [
    (0.40, 0.30, "HGG"),  # argmax would say LGG: the stored threshold lies below P(HGG)
    (0.60, 0.70, "LGG"),  # argmax would say HGG: the stored threshold lies above P(HGG)
])
def test_node_labels_by_the_stored_threshold(tmp_path: Path, fs3d_case: Any, p_hgg: float, threshold: float,
                                             expected: str) -> None:
    folder = tmp_path / f"ck-{p_hgg}"
    folder.mkdir()
    _save_fs3d(folder / "fs3dcnn.pt", p_hgg, thresholds={"grade": threshold})
    (t,) = _run(folder, fs3d_case).tasks
    assert t.probability == pytest.approx(p_hgg, abs=1e-5)
    assert (t.label, t.threshold, t.threshold_source) == (expected, threshold, "validation")
    argmax = max(t.probabilities, key=t.probabilities.__getitem__)
    assert argmax != expected  # the case is one where the rule matters
    # the same network without a stored threshold: 0.5, i.e. argmax, as before
    old = tmp_path / f"old-{p_hgg}"
    old.mkdir()
    _save_fs3d(old / "fs3dcnn.pt", p_hgg, thresholds=None)
    (t0,) = _run(old, fs3d_case).tasks
    assert (t0.label, t0.threshold, t0.threshold_source) == (argmax, 0.5, "default")


def test_node_thresholds_the_calibrated_probability(tmp_path: Path, fs3d_case: Any) -> None:
    # raw P(HGG) 0.731 is above the threshold 0.65; calibrated with T = 4 it is 0.562, below it
    p_raw, temperature, threshold = 1 / (1 + math.exp(-1.0)), 4.0, 0.65
    _save_fs3d(tmp_path / "fs3dcnn.pt", p_raw, thresholds={"grade": threshold}, temperature=temperature)
    (t,) = _run(tmp_path, fs3d_case).tasks
    expected_p = calibrate(np.array([1 - p_raw, p_raw]), temperature)[1]
    assert expected_p < threshold < p_raw
    assert t.probability == pytest.approx(expected_p, abs=1e-5) and t.calibrated
    assert t.label == "LGG"


def test_floor_reads_figures_counted_at_the_operating_threshold(tmp_path: Path, fs3d_case: Any) -> None:
    good = {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.7}
    # figures counted at the stored threshold: reported
    (tmp_path / "a").mkdir()
    _save_fs3d(tmp_path / "a" / "fs3dcnn.pt", 0.4, thresholds={"grade": 0.3},
               metrics={"test": {**good, "threshold": 0.3}})
    result = _run(tmp_path / "a", fs3d_case, FloorSettings())
    assert [t.label for t in result.tasks] == ["HGG"]
    # figures counted at 0.5 but labels at 0.3: they describe another operating point -> withheld
    (tmp_path / "b").mkdir()
    _save_fs3d(tmp_path / "b" / "fs3dcnn.pt", 0.4, thresholds={"grade": 0.3},
               metrics={"test": {**good, "threshold": 0.5}})
    result = _run(tmp_path / "b", fs3d_case, FloorSettings())
    assert result.tasks == []
    assert any("measured at threshold 0.500, but the checkpoint labels at 0.300" in f for f in result.quality_flags)
    # with the sensitivity/specificity floors off, the operating point does not matter to the floor
    result = _run(tmp_path / "b", fs3d_case, FloorSettings(sensitivity=0, specificity=0))
    assert [t.label for t in result.tasks] == ["HGG"]


def test_withholding_a_mismatched_idh_withholds_1p19q_too() -> None:
    def task(name: str, label: str, p: float, threshold: float) -> TaskResult:
        neg, pos = {"grade": ("LGG", "HGG"), "idh": ("IDH-wildtype", "IDH-mutant"),
                    "1p19q": ("1p/19q-intact", "1p/19q-codeleted")}[name]
        return TaskResult(name, label, p, {neg: 1 - p, pos: p}, True, threshold, "validation")

    ok = {"auc": 0.9, "sensitivity": 0.8, "specificity": 0.8}
    metrics = {"test": {"grade": {**ok, "threshold": 0.4}, "idh": {**ok, "threshold": 0.5},
                        "1p19q": {**ok, "threshold": 0.6}}}
    tasks = [task("grade", "HGG", 0.7, 0.4), task("idh", "IDH-mutant", 0.7, 0.45),
             task("1p19q", "1p/19q-codeleted", 0.7, 0.6)]
    kept, flags = withhold_under_floor(tasks, metrics, ["grade", "idh", "1p19q"], FloorSettings())
    assert [t.task for t in kept] == ["grade"]
    assert flags[0].startswith("IDH not reported: its held-out sensitivity and specificity were measured at "
                               "threshold 0.500, but the checkpoint labels at 0.450")
    assert "1p/19q not reported" in flags[1]
    # no recorded threshold (older checkpoints): judged as before
    assert floor_threshold_mismatch({"test": ok}, "grade", ["grade"], 0.3) is None


def test_task_result_threshold_is_validated_and_old_records_default() -> None:
    old = TaskResult("grade", "HGG", 0.8, {"LGG": 0.2, "HGG": 0.8}, True)
    assert (old.threshold, old.threshold_source) == (0.5, "default")
    for bad in (0.0, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match="threshold"):
            TaskResult("grade", "HGG", 0.8, {"LGG": 0.2, "HGG": 0.8}, True, bad)
    with pytest.raises(ValueError, match="threshold_source"):
        TaskResult("grade", "HGG", 0.8, {"LGG": 0.2, "HGG": 0.8}, True, 0.4, "test")


def test_same_label_rule_as_the_stored_metrics() -> None:
    # the node's rule (>=) and training.metrics' rule agree at the boundary itself
    from dicomnode.stages.infer import label_at

    for p, t in itertools.product([0.3, 0.45, 0.5, 0.62], [0.3, 0.45, 0.5, 0.62]):
        predicted_positive = binary_metrics([1], [p], t).tp == 1
        assert (label_at(("LGG", "HGG"), np.array([1 - p, p]), t) == "HGG") == predicted_positive
