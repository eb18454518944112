"""MMDLM protocol: stage 3 on cases stage 1 never saw, selection only on tasks with enough validation
cases, 1p/19q only on IDH-mutant cases, stage-1 augmentation in training only, thresholds and CIs.

Tiny cohort (16 cases) and networks: these check what the protocol does with cases and labels, not
whether it learns (docs/mmdlm.md has the measured figures).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import need

try:
    import nilearn  # noqa: F401  - the synthetic cohort's anatomy
    HAVE_NILEARN = True
except ImportError:
    HAVE_NILEARN = False

from models.checkpoint import load_checkpoint
from models.mmdlm import FAMILY
from training.cases import Case
from training.data import VolumeCache
from training.datasets import read_dataset
from training.protocols import ConfigError, RunOptions, load_config
from training.protocols import mmdlm

from test_mmdlm_repro import TINY_SETS


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(HAVE_NILEARN, "nilearn not installed (the synthetic cohort's anatomy is its MNI152 template)")
    from training.cohort import generate_cohort

    out = tmp_path_factory.mktemp("mm-proto-cohort")
    generate_cohort(out, n_cases=16, hgg_fraction=0.5, seed=5, shape=(32, 32, 24), spacing=(6.0, 6.0, 6.5),
                    workers=1)
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("mm-proto-run")
    summary = mmdlm.run(load_config("mmdlm", sets=TINY_SETS), data_dir=cohort, out_dir=out,
                        options=RunOptions(device="cpu", repeats=1, resume=False))
    return out, summary, json.loads((out / "fold0" / "result.json").read_text())


def _case(cid: str, grade: int | None, idh: int | None, codel: int | None) -> Case:
    return Case(case_id=cid, patient_id=cid, images={}, seg=None,
                labels={"grade": grade, "idh": idh, "1p19q": codel}, source="test")


def test_stage3_trains_on_training_patients_stage1_never_saw(run: tuple[Path, dict, dict]) -> None:
    out, _, result = run
    parts = result["parts"]
    s1, s3 = set(parts["stage1_ids"]), set(parts["stage3_ids"])
    split = json.loads((out / "splits.json").read_text())["splits"][0]
    assert s1 and s3 and not s1 & s3
    assert s1 | s3 == set(split["train_ids"])
    assert not (s1 | s3) & (set(parts["val_ids"]) | set(parts["test_ids"]))
    assert result["stage3"]["train_cases"] == len(s3) and result["stage1"]["T2"]["train_cases"] == len(s1)
    # the checkpoint records every training case (both stages) for the node's provenance
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert set(ckpt["training_data"]["train_case_ids"]) == s1 | s3


def test_stage_parts_are_stratified_patient_level_and_switchable(cohort: Path) -> None:
    cases = read_dataset(cohort)
    cfg = load_config("mmdlm", sets=['split.strata="grade"'])
    s1, s3 = mmdlm.stage_parts(cfg, cases, seed=0)
    assert len(s1) == len(s3) == len(cases) // 2
    grades = [c.labels["grade"] for c in cases]
    assert sorted(c.labels["grade"] for c in s3).count(0) == pytest.approx(grades.count(0) / 2, abs=1)
    assert mmdlm.stage_parts(cfg, cases, seed=0) == (s1, s3)  # a function of the seed
    assert mmdlm.stage_parts(cfg, cases, seed=1) != (s1, s3)
    same = load_config("mmdlm", sets=['stage3.cases="same"'])
    assert mmdlm.stage_parts(same, cases, seed=0) == (cases, cases)
    with pytest.raises(ConfigError, match="stage3.cases"):
        mmdlm.stage_parts(load_config("mmdlm", sets=['stage3.cases="oof"']), cases, seed=0)
    with pytest.raises(ConfigError, match="stage3.fraction"):
        mmdlm.stage_parts(load_config("mmdlm", sets=["stage3.fraction=1.0"]), cases, seed=0)


def test_selection_uses_only_tasks_with_enough_validation_cases_of_each_class() -> None:
    cfg = load_config("mmdlm")
    loss = mmdlm._loss(cfg, [])
    val = ([_case(f"h{i}", 1, 0, None) for i in range(4)] + [_case("l0", 0, 1, 1)]
           + [_case(f"l{i}", 0, 1, 0) for i in range(1, 4)] + [_case("u", 0, None, 1)])
    tasks, counts = mmdlm.selection_tasks(loss, val, 3)
    # grade 4 LGG + 1 unknown-IDH LGG / 4 HGG; IDH 4 wildtype / 4 mutant; 1p/19q on IDH-mutant only: 3 / 1
    assert counts == {"grade": [5, 4], "idh": [4, 4], "1p19q": [3, 1]}
    assert tasks == ["grade", "idh"]
    assert mmdlm.selection_tasks(loss, val, 5)[0] == []


def test_the_run_records_its_selection_and_falls_back_to_validation_loss(run: tuple[Path, dict, dict]) -> None:
    out, summary, result = run
    sel = result["selection"]
    assert sel["min_per_class"] == 3
    for t, c in sel["val_counts"].items():
        assert (t in sel["tasks"]) == (min(c["negative"], c["positive"]) >= 3)
    # 4 validation cases: no task can have 3 of each class, so the epoch is chosen on validation loss
    assert sel["tasks"] == [] and result["stage3"]["select_on"] == "val_loss"
    assert "validation loss" in summary["auc_ci_markdown"]


def test_1p19q_loss_counts_only_idh_mutant_cases() -> None:
    """The node states 1p/19q only for a study it calls IDH-mutant; training counts the same cases."""
    cfg = load_config("mmdlm")
    assert cfg["loss"]["one_p19q_rule"] == "idh_mutant"
    loss = mmdlm._loss(cfg, [])
    # IDH-mutant, IDH-wildtype, IDH unknown (1p/19q known), IDH-mutant with 1p/19q unknown
    targets = {"grade": torch.tensor([0, 1, 0, 0]), "idh": torch.tensor([1, 0, -1, 1]),
               "1p19q": torch.tensor([1, 0, 1, -1])}
    assert loss.effective_masks(targets)["1p19q"].tolist() == [True, False, False, False]
    logits = {t: torch.zeros(4, requires_grad=True) for t in ("grade", "idh", "1p19q")}
    total, parts = loss(logits, targets)
    total.backward()
    grad = logits["1p19q"].grad
    assert grad is not None and grad[0] != 0 and torch.all(grad[1:] == 0)
    # the evaluation's mask is the loss's: only IDH-mutant test cases count for 1p/19q
    assert mmdlm._masked(loss, targets)["1p19q"].tolist() == [1, -1, -1, -1]


def test_report_marks_1p19q_counted_only_on_idh_mutant_test_cases(run: tuple[Path, dict, dict]) -> None:
    _, _, result = run
    tp = result["test_pred"]
    counted = np.asarray(tp["1p19q"]["counted"], dtype=bool)
    idh = np.asarray(tp["idh"]["y"])
    assert not np.any(counted & (idh != 1))


def test_stage1_augments_training_slices_only_and_differently_each_epoch(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("mmdlm", sets=TINY_SETS)
    cases = read_dataset(cohort)
    spec = FAMILY.spec_for(dict(cfg["model"]))
    cache = VolumeCache(spec, tmp_path / "cache")
    work = mmdlm._Split(cfg, RunOptions(device="cpu"), cache, spec, cases[:10], cases[10:13], cases[13:], 0,
                        tmp_path / "f", "k", {})
    assert work.augment is not None and work.augment.rotate_deg == 30.0
    pos = [np.flatnonzero(cache.get(c).slice_mask) for c in work.s1]
    targets = mmdlm._masked(work.loss, mmdlm._targets(work.s1))
    plain = mmdlm.SliceDataset(work.s1, cache, "T1CE", pos, targets, True)
    aug = mmdlm.SliceDataset(work.s1, cache, "T1CE", pos, targets, True, augment=work.augment, seed=0)
    items = [0, len(plain) // 2, len(plain) - 1]
    x = torch.stack([aug[k]["x"] for k in items])
    assert torch.equal(x, torch.stack([plain[k]["x"] for k in items]))  # items themselves are never augmented
    assert [aug[k]["item"] for k in items] == items
    a0 = aug.augment_batch(x, items)
    assert a0.shape == x.shape and all(not torch.equal(a0[i], x[i]) for i in range(len(items)))
    assert torch.equal(aug.augment_batch(x, items), a0)  # the same (seed, epoch, item): the same draw
    # an item's draw does not depend on the batch it comes in
    assert torch.equal(aug.augment_batch(x[1:2], items[1:2])[0], a0[1])
    aug.set_epoch(1)
    assert not torch.equal(aug.augment_batch(x, items), a0)
    assert torch.equal(plain.augment_batch(x, items), x)  # no augmentation configured: unchanged
    off = load_config("mmdlm", sets=[*TINY_SETS, "stage1.augment.enabled=false"])
    assert mmdlm._Split(off, RunOptions(device="cpu"), cache, spec, cases[:10], cases[10:13], cases[13:], 0,
                        tmp_path / "g", "k", {}).augment is None


def test_thresholds_and_auc_cis_are_exported(run: tuple[Path, dict, dict]) -> None:
    out, summary, result = run
    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt.thresholds == result["thresholds"]
    assert all(0 < t < 1 for t in ckpt.thresholds.values())
    raw = torch.load(result["checkpoint"], weights_only=True)
    for task in ("grade", "idh", "1p19q", "1p19q_all"):
        m = raw["metrics"]["test"][task]
        assert "auc_ci" in m and len(m["auc_ci"]) == 2 and m["threshold_rule"] == "youden_val"
    for task in ckpt.thresholds:  # the test metrics were measured at the stored threshold
        assert raw["metrics"]["test"][task]["threshold"] == pytest.approx(ckpt.thresholds[task])
    md = (out / "report" / "mmdlm_auc_ci.md").read_text()
    assert "Grade AUC [95 % CI]" in md and "| 0 |" in md and "mean over folds [pooled 95 % CI]" in md
    assert summary["auc_ci"]["folds"][0]["fold"] == 0
    # rebuilt from the saved fold results, without training
    assert mmdlm.evaluate(out)["auc_ci_markdown"] == summary["auc_ci_markdown"]


def test_stage1_training_step_applies_the_augmentation(cohort: Path, tmp_path: Path) -> None:
    """Wiring: the same seed with augmentation on trains other weights than with it off, and the same
    weights when repeated (the draws are the seed's, not the global RNG's)."""
    from training.loop import seed_everything

    cases = read_dataset(cohort)
    cache = None

    def stage1(name: str, *extra: str) -> dict[str, torch.Tensor]:
        nonlocal cache
        cfg = load_config("mmdlm", sets=[*TINY_SETS, "stage1.epochs=1", *extra])
        spec = FAMILY.spec_for(dict(cfg["model"]))
        cache = cache or VolumeCache(spec, tmp_path / "cache")
        work = mmdlm._Split(cfg, RunOptions(device="cpu", resume=False), cache, spec, cases[:10], cases[10:13],
                            cases[13:], 0, tmp_path / name, "k", {})
        seed_everything(0)
        model = FAMILY.build(dict(cfg["model"]))
        work.stage1(model)
        return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("extractors.T1CE.")}

    on, again, off = stage1("on"), stage1("again"), stage1("off", "stage1.augment.enabled=false")
    assert all(torch.equal(on[k], again[k]) for k in on)
    assert any(not torch.equal(on[k], off[k]) for k in on)
