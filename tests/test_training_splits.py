"""Patient-level stratified splits: seed 000's repeated 4:1 hold-out and k-fold CV."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.splits import SplitPlan, joint_strata, repeated_holdout, stratified_kfold

# BraTS2020: 369 cases, LGG are 260-335 (76), the rest HGG (293).
BRATS_IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]
BRATS_GRADE = [0 if 260 <= i <= 335 else 1 for i in range(1, 370)]


def _multi_visit_cohort() -> tuple[list[str], list[str], list[int]]:
    """30 patients, some with 2-3 scans each; patients 0-7 LGG, the rest HGG."""
    cases: list[str] = []
    patients: list[str] = []
    labels: list[int] = []
    for p in range(30):
        for v in range(1 + p % 3):
            cases.append(f"P{p:02d}_V{v}")
            patients.append(f"P{p:02d}")
            labels.append(0 if p < 8 else 1)
    return cases, patients, labels


def _assert_patient_level(plan: SplitPlan) -> None:
    for split in plan:
        where: dict[str, set[str]] = {}
        for part in ("train", "val", "test"):
            for i in split.part(part):
                where.setdefault(plan.patient_ids[int(i)], set()).add(part)
        assert all(len(parts) == 1 for parts in where.values()), where


def test_brats_holdout_is_4_to_1_stratified_and_repeated() -> None:
    plan = repeated_holdout(BRATS_IDS, BRATS_GRADE, seed=0)
    assert plan.scheme == "repeated-holdout" and len(plan) == 5
    y = np.array(BRATS_GRADE)
    tests = []
    for split in plan:
        assert len(split.test) == 74 and len(split.train) == 295 and len(split.val) == 0
        # 293 * 0.2 = 58.6 -> 59 HGG, 76 * 0.2 = 15.2 -> 15 LGG (largest remainder).
        assert int(y[split.test].sum()) == 59
        assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(369))
        assert split.test_ids == tuple(BRATS_IDS[i] for i in split.test)
        tests.append(frozenset(split.test.tolist()))
    assert len(set(tests)) == 5, "repeats must be fresh draws"


def test_same_seed_same_splits_and_input_order_does_not_matter() -> None:
    a = repeated_holdout(BRATS_IDS, BRATS_GRADE, seed=7, val_fraction=0.1)
    b = repeated_holdout(BRATS_IDS, BRATS_GRADE, seed=7, val_fraction=0.1)
    c = repeated_holdout(BRATS_IDS, BRATS_GRADE, seed=8, val_fraction=0.1)
    assert a == b and a.to_json() == b.to_json()
    assert a != c
    order = np.random.RandomState(1).permutation(369)
    shuffled = repeated_holdout([BRATS_IDS[i] for i in order], [BRATS_GRADE[i] for i in order], seed=7, val_fraction=0.1)
    for s1, s2 in zip(a, shuffled):
        assert set(s1.test_ids) == set(s2.test_ids) and set(s1.val_ids) == set(s2.val_ids)


def test_pinned_splits_do_not_drift() -> None:
    """Recorded runs rely on seed -> split staying fixed across library versions."""
    ids = [f"c{i:02d}" for i in range(20)]
    labels = [int(i % 3 == 0) for i in range(20)]
    hold = repeated_holdout(ids, labels, repeats=2, seed=0)
    assert [s.test_ids for s in hold] == [("c07", "c10", "c17", "c18"), ("c04", "c10", "c12", "c19")]
    folds = stratified_kfold(ids, labels, k=4, seed=0)
    assert folds[0].test_ids == ("c03", "c04", "c10", "c14", "c19")
    assert folds[3].test_ids == ("c00", "c08", "c11", "c15", "c16")


def test_kfold_tests_every_case_once_with_balanced_folds() -> None:
    plan = stratified_kfold(BRATS_IDS, BRATS_GRADE, k=5, seed=0)
    y = np.array(BRATS_GRADE)
    all_test = np.concatenate([s.test for s in plan])
    assert sorted(all_test.tolist()) == list(range(369))
    sizes = [len(s.test) for s in plan]
    assert max(sizes) - min(sizes) <= 1
    lgg = [int((y[s.test] == 0).sum()) for s in plan]
    assert max(lgg) - min(lgg) <= 1 and sum(lgg) == 76
    for s in plan:
        assert not set(s.train.tolist()) & set(s.test.tolist())
        assert len(s.train) + len(s.test) == 369


@pytest.mark.parametrize("scheme", ["holdout", "kfold"])
def test_no_patient_in_two_parts_and_stratified_on_patients(scheme: str) -> None:
    cases, patients, labels = _multi_visit_cohort()
    if scheme == "holdout":
        plan = repeated_holdout(cases, labels, patients, val_fraction=0.25, seed=3)
    else:
        plan = stratified_kfold(cases, labels, patients, k=5, val_fraction=0.25, seed=3)
    _assert_patient_level(plan)
    for split in plan:
        test_patients = {patients[i] for i in split.test}
        lgg_patients = {p for p in test_patients if int(p[1:]) < 8}
        if scheme == "holdout":
            # 30 patients * 0.2 = 6: 8 LGG -> 1.6, 22 HGG -> 4.4 => 2 LGG + 4 HGG patients.
            assert len(test_patients) == 6 and len(lgg_patients) == 2
        else:
            assert len(test_patients) == 6 and len(lgg_patients) in (1, 2)
        assert len(split.val) > 0
        assert {labels[i] for i in split.val} == {0, 1}, "validation must be stratified too"


def test_validation_is_carved_from_training_never_from_test() -> None:
    plan = repeated_holdout(BRATS_IDS, BRATS_GRADE, val_fraction=0.1, seed=0)
    no_val = repeated_holdout(BRATS_IDS, BRATS_GRADE, val_fraction=0.0, seed=0)
    for s in plan:
        assert len(s.val) == 30 and len(s.train) == 265 and len(s.test) == 74
        assert not set(s.val.tolist()) & set(s.test.tolist())
        assert not set(s.val.tolist()) & set(s.train.tolist())
    # The first repeat's test part is drawn before any validation draw.
    assert plan[0].test_ids == no_val[0].test_ids
    assert all(len(s.val) == 0 for s in no_val)


def test_index_arrays_index_data_and_are_read_only() -> None:
    plan = stratified_kfold(BRATS_IDS, BRATS_GRADE, k=5, seed=0)
    x = np.arange(369) * 10
    split = plan[0]
    assert (x[split.test] == split.test * 10).all()
    assert split.test.dtype == np.int64
    with pytest.raises(ValueError):
        split.test[0] = 5


def test_json_round_trip_and_tampering_is_refused(tmp_path: Path) -> None:
    cases, patients, labels = _multi_visit_cohort()
    plan = stratified_kfold(cases, labels, patients, k=3, val_fraction=0.2, seed=1)
    path = plan.save(tmp_path / "run" / "splits.json")
    again = SplitPlan.load(path)
    assert again == plan
    assert again.params["k"] == 3 and again.seed == 1

    data = json.loads(path.read_text())
    # Move one visit of a test patient into train: a patient now spans two parts.
    s0 = data["splits"][0]
    test_patients = Counter(data["patient_ids"][i] for i in s0["test"])
    pos = next(k for k, i in enumerate(s0["test"]) if test_patients[data["patient_ids"][i]] > 1)
    moved = s0["test"].pop(pos)
    s0["test_ids"].pop(pos)
    s0["train"] = sorted(s0["train"] + [moved])
    s0["train_ids"] = [data["case_ids"][i] for i in s0["train"]]
    with pytest.raises(ValueError, match="patient .* in both"):
        SplitPlan.from_dict(data)

    with pytest.raises(ValueError, match="not a split plan"):
        SplitPlan.from_dict({"format": "something-else"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SplitPlan.load(bad)
    with pytest.raises(ValueError, match="cannot read"):
        SplitPlan.load(tmp_path / "missing.json")


def test_missing_and_joint_labels_and_notes() -> None:
    ids = [f"c{i:02d}" for i in range(40)]
    grade = [i % 2 for i in range(40)]
    idh = [None if i % 5 == 0 else float("nan") if i % 7 == 0 else (i // 2) % 2 for i in range(40)]
    strata = joint_strata(grade, idh)
    assert strata[0] == (0, None) and strata[7] == (1, None)
    plan = stratified_kfold(ids, strata, k=4, seed=0)
    counts = Counter(plan.labels)
    per_fold = [Counter(plan.labels[i] for i in s.test) for s in plan]
    for key, total in counts.items():
        got = [c[key] for c in per_fold]
        assert max(got) - min(got) <= 1 and sum(got) == total
    assert SplitPlan.from_json(plan.to_json()) == plan  # tuple labels survive JSON

    small = repeated_holdout(ids[:10], [0] * 9 + [1], repeats=1)
    assert small.notes and "fewer than 2" in small.notes[0]


def test_conflicting_labels_of_one_patient() -> None:
    cases = ["a1", "a2", "b1", "c1", "d1", "e1"]
    patients = ["A", "A", "B", "C", "D", "E"]
    labels = [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="patient 'A' has cases with different labels"):
        repeated_holdout(cases, labels, patients)
    plan = repeated_holdout(cases, labels, patients, on_conflict="max", repeats=3)
    _assert_patient_level(plan)
    # A missing label does not conflict with a known one.
    repeated_holdout(cases, [0, None, 0, 1, 0, 1], patients)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: repeated_holdout([], []), "no cases"),
        (lambda: repeated_holdout(["a", "b"], [0]), "2 case ids but 1 labels"),
        (lambda: repeated_holdout(["a", "a"], [0, 1]), "unique"),
        (lambda: repeated_holdout(["a", "b"], [0, 1], ["p"]), "patient ids"),
        (lambda: repeated_holdout(["a"], [0]), "at least 2 patients"),
        (lambda: repeated_holdout(["a", "b"], [0, 1], test_fraction=1.0), "test_fraction"),
        (lambda: repeated_holdout(["a", "b"], [0, 1], repeats=0), "repeats"),
        (lambda: repeated_holdout(["a", "b"], [0, 1], val_fraction=0.5), "validation part out of 1"),
        (lambda: repeated_holdout(["a", "b"], [0, 1], val_fraction=1.5), "val_fraction"),
        (lambda: repeated_holdout(["a", "b"], [0, {"x": 1}]), "stratification label"),
        (lambda: repeated_holdout(["a", "b"], [0, 1], on_conflict="min"), "on_conflict"),
        (lambda: stratified_kfold(["a", "b", "c"], [0, 1, 0], k=5), "at least 5 patients"),
        (lambda: stratified_kfold(["a", "b"], [0, 1], k=1), "k must be"),
        (lambda: joint_strata([0, 1], [0]), "label list 1"),
    ],
)
def test_bad_inputs_give_clear_errors(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
