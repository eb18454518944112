"""Seed 001's protocol (training.protocols.crossmodal) on a tiny synthetic cohort.

Tiny on purpose (10 cases of 24x24x20 voxels, a network of widths 4-8, one epoch per stage): the
tests prove the protocol's wiring (stages, weights carried over, selection on validation, export
the node loads, report, resume), not that it learns; the experiment on the small profile does that.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import need

try:
    import nilearn  # noqa: F401  - the synthetic cohort's anatomy
    HAVE_NILEARN = True
except ImportError:
    HAVE_NILEARN = False

from models.base import ROLES
from models.checkpoint import load_checkpoint
from models.crossmodal import FAMILY, set_stage
from models.preprocess import apply_spec, to_batch
from training.cases import labels_array
from training.data import VolumeCache
from training.datasets import read_dataset
from training.protocols import ConfigError, RunOptions, load_config
from training.protocols import crossmodal

TINY_SETS = [
    "model.input_size=[20, 24, 24]",
    "model.widths=[4, 4, 8, 8]",
    "model.guide_channels=4",
    "model.hidden=8",
    "model.norm_groups=2",
    "data.spacing=[8.0, 8.0, 8.0]",
    "stages.epochs_primary=1",
    "stages.epochs_per_secondary=1",
    "stages.measure_epochs=1",
    "split.val_fraction=0.25",
    "train.lr=1e-3",
    "train.batch_size=2",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(HAVE_NILEARN, "nilearn not installed (the synthetic cohort's anatomy is its MNI152 template)")
    from training.cohort import generate_cohort

    out = tmp_path_factory.mktemp("cm-cohort")
    generate_cohort(out, n_cases=10, hgg_fraction=0.5, seed=3, shape=(24, 24, 20), spacing=(8.0, 8.0, 8.0),
                    workers=1)
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _options(**kw: object) -> RunOptions:
    return RunOptions(device="cpu", repeats=1, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cm-run")
    cfg = load_config("crossmodal", sets=TINY_SETS)
    summary = crossmodal.run(cfg, data_dir=cohort, out_dir=out, options=_options())
    return out, summary


def test_run_exports_a_checkpoint_the_node_loads_and_predicts(cohort: Path, trained: tuple[Path, dict]) -> None:
    out, summary = trained
    (ckpt_path,) = summary["checkpoints"]
    ckpt = load_checkpoint(ckpt_path)  # validates hash, spec fit, weights
    assert ckpt.family.name == "crossmodal"
    assert ckpt.temperature is not None and ckpt.temperature > 0
    # the final model has every secondary active, in the prior order, as the checkpoint records
    assert tuple(ckpt.model.active_roles) == ("T1CE", "FLAIR", "T2", "T1")
    assert ckpt.hparams["secondary_order"] == ["FLAIR", "T2", "T1"]
    assert ckpt.training_data["train"]["n_cases"] >= 4
    assert set(ckpt.metrics) >= {"val", "test", "stages", "calibration"}
    gate = ckpt.extra["gate"]  # the node's gate: training ranges, features thresholded on validation
    assert gate["n_cases"] == ckpt.training_data["train"]["n_cases"] and gate["ranges"]
    assert gate["features"]["dim"] == 4 * ckpt.model.feature_channels and gate["features"]["n_val"] > 0
    # serve path: the checkpoint's own spec on a raw case, then predict
    case = read_dataset(cohort)[0]
    pre = apply_spec(ckpt.spec, {r: case.images[r] for r in ckpt.input_roles})
    pred = ckpt.family.predict(ckpt.model, to_batch([pre], ckpt.input_roles))
    assert pred.probabilities["grade"].shape == (1, 2)
    assert torch.allclose(pred.probabilities["grade"].sum(1), torch.ones(1))
    index = json.loads((out / "checkpoints.json").read_text())["checkpoints"]
    assert index[0]["row"] == "guided" and index[0]["family"] == "crossmodal"


def test_the_operating_threshold_is_chosen_on_validation_and_stored(trained: tuple[Path, dict]) -> None:
    """The checkpoint's threshold is the one its stored val/test figures were counted at."""
    from training.metrics import binary_metrics

    out, summary = trained
    (ckpt_path,) = summary["checkpoints"]
    ckpt = load_checkpoint(ckpt_path)
    result = json.loads((out / "repeat0" / "result.json").read_text())
    t = result["threshold"]
    assert 0.0 < t < 1.0 and ckpt.thresholds == {"grade": t}
    val, test = ckpt.metrics["val"], ckpt.metrics["test"]
    assert val["threshold"] == test["threshold"] == t and test["threshold_rule"] == "youden_val"
    # the test figures are counted at t on the calibrated probabilities the record keeps
    ref = binary_metrics(result["test_pred"]["y"], result["test_pred"]["p"], threshold=t)
    assert (test["tp"], test["fp"], test["tn"], test["fn"]) == (ref.tp, ref.fp, ref.tn, ref.fn)
    assert len(test["auc_ci"]) == 2 and test["n"] == len(result["test_pred"]["y"])


def test_run_writes_report_with_stage_rows(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    md = (out / "report" / "table1.md").read_text(encoding="utf-8")
    assert "Cross-modality guidance | FS-MRI" in md
    assert "Primary only (stage 1) | T1CE |" in md
    assert "T1CE+FLAIR+T2 |" in md
    assert "Departures from the paper" in md
    for name in ("table1.csv", "table1_roc_pr.png", "table1_reliability.png", "table1_predictions.json"):
        assert (out / "report" / name).stat().st_size > 0
    result = json.loads((out / "repeat0" / "result.json").read_text())
    assert [s["label"] for s in result["stages"]] == ["T1CE", "T1CE+FLAIR", "T1CE+FLAIR+T2", "T1CE+FLAIR+T2+T1"]
    assert all(s["best_epoch"] == 1 for s in result["stages"])
    # the test part is disjoint from train/val (patient level) and never used for selection
    assert json.loads((out / "run.json").read_text())["protocol"] == "crossmodal"  # what the CLI reads
    split = json.loads((out / "splits.json").read_text())["splits"][0]
    assert not set(split["test_ids"]) & (set(split["train_ids"]) | set(split["val_ids"]))
    assert set(result["test_pred"]["case_ids"]) == set(split["test_ids"])


def test_resume_reuses_finished_repeats_and_evaluate_rebuilds(cohort: Path, trained: tuple[Path, dict]) -> None:
    out, summary = trained
    mtime = Path(summary["checkpoints"][0]).stat().st_mtime_ns
    cfg = load_config("crossmodal", sets=TINY_SETS)
    again = crossmodal.run(cfg, data_dir=cohort, out_dir=out, options=_options())
    assert again["table_markdown"] == summary["table_markdown"]
    assert Path(again["checkpoints"][0]).stat().st_mtime_ns == mtime  # not trained or exported again
    rebuilt = crossmodal.evaluate(out)
    assert rebuilt["table_markdown"] == summary["table_markdown"]


def test_stage_switch_keeps_primary_weights_and_freeze_primary_holds_them(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("crossmodal", sets=TINY_SETS)
    cases = read_dataset(cohort)
    cache = VolumeCache(crossmodal._spec(cfg), tmp_path / "cache")
    trainer = crossmodal._Trainer(cfg, _options(), cache, cases[:6], cases[6:8], cases[8:], "k", 0)
    model = FAMILY.build(dict(cfg["model"]))
    set_stage(model, "primary")
    before_t1 = {k: v.clone() for k, v in model.branches["T1"].state_dict().items()}
    trainer.train_stage(model, tmp_path / "s0", 1, "s0")
    primary = {k: v.clone() for k, v in model.branches["T1CE"].state_dict().items()}
    # stage 1 trained only the primary: the inactive secondaries are untouched
    assert all(torch.equal(before_t1[k], v) for k, v in model.branches["T1"].state_dict().items())
    set_stage(model, "all", ["FLAIR"], freeze_primary=True)
    assert all(torch.equal(primary[k], v) for k, v in model.branches["T1CE"].state_dict().items())
    flair_before = {k: v.clone() for k, v in model.branches["FLAIR"].state_dict().items()}
    trainer.train_stage(model, tmp_path / "s1", 1, "s1")
    assert all(torch.equal(primary[k], v) for k, v in model.branches["T1CE"].state_dict().items())
    assert any(not torch.equal(flair_before[k], v) for k, v in model.branches["FLAIR"].state_dict().items())


def test_class_weights_come_from_the_training_part(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("crossmodal", sets=TINY_SETS)
    cases = read_dataset(cohort)
    train = cases[:7]
    cache = VolumeCache(crossmodal._spec(cfg), tmp_path / "cache")
    trainer = crossmodal._Trainer(cfg, _options(), cache, train, cases[7:8], cases[8:], "k", 0)
    y = labels_array(train, "grade")
    n, n1 = len(y), int((y == 1).sum())
    assert trainer.class_weights == pytest.approx([n / (2 * (n - n1)), n / (2 * n1)])


def test_measured_order_and_kfold(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("crossmodal", sets=[*TINY_SETS, 'stages.secondary_order="measure"', 'split.scheme="kfold"',
                                          "split.k=3", "protocol.stage_rows=false", 'stages.final="best_val"'])
    summary = crossmodal.run(cfg, data_dir=cohort, out_dir=tmp_path, options=_options())
    result = json.loads((tmp_path / "repeat0" / "result.json").read_text())
    assert sorted(result["secondary_order"]) == ["FLAIR", "T1", "T2"]
    assert set(result["single_modality_val_auc"]) == {"FLAIR", "T1", "T2"}
    assert result["final_stage"] in {s["label"] for s in result["stages"]}
    assert "Primary only" not in summary["table_markdown"]
    ckpt = load_checkpoint(summary["checkpoints"][0])
    assert ckpt.hparams["secondary_order"] == result["secondary_order"]


def test_bad_configs_are_clear_errors(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("crossmodal", sets=[*TINY_SETS, 'stages.secondary_order="T2,T2,T1"'])
    with pytest.raises(ConfigError, match="secondary_order"):
        crossmodal.run(cfg, data_dir=cohort, out_dir=tmp_path / "a", options=_options())
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config("crossmodal", sets=["stages.epochs=3"])
    cfg = load_config("crossmodal", sets=[*TINY_SETS, "data.spacing=[4.0, 4.0, 4.0]", "split.val_fraction=0.0"])
    with pytest.raises(ConfigError, match="validation"):
        crossmodal.run(cfg, data_dir=cohort, out_dir=tmp_path / "b", options=_options())
    assert set(ROLES) == {"T1", "T1CE", "T2", "FLAIR"}
