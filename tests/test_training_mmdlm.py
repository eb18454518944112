"""Seed 002's protocol (training.protocols.mmdlm) on a tiny synthetic cohort.

Tiny on purpose (12 cases of 24x24x20 voxels, bags of 8 slices of 16x16, ResNet widths 4-8, one or
two epochs): the tests prove the wiring of the three stages, the masks, selection on validation,
the export the node loads, the report and resume; the small-profile experiment shows learning.
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
from models.preprocess import apply_spec, to_batch
from training.data import VolumeCache
from training.datasets import read_dataset
from training.protocols import ConfigError, RunOptions, load_config
from training.protocols import mmdlm

from mmdlm_util import TINY_NET_SETS

TINY_SETS = [*TINY_NET_SETS, "stage1.epochs=1", "stage1.lr=1e-3", "stage3.epochs=2", "stage3.lr=1e-3", "stage3.batch_size=4"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(HAVE_NILEARN, "nilearn not installed (the synthetic cohort's anatomy is its MNI152 template)")
    from training.cohort import generate_cohort

    out = tmp_path_factory.mktemp("mm-cohort")
    # IDH/1p19q withheld for some cases: the protocol must train and report with missing labels
    generate_cohort(out, n_cases=12, hgg_fraction=0.5, seed=4, shape=(24, 24, 20), spacing=(8.0, 8.0, 8.0),
                    params={"p_missing_molecular": 0.25}, workers=1)
    return out


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _options(**kw: object) -> RunOptions:
    return RunOptions(device="cpu", repeats=1, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mm-run")
    summary = mmdlm.run(load_config("mmdlm", sets=TINY_SETS), data_dir=cohort, out_dir=out, options=_options())
    return out, summary


def test_three_stages_run_and_export_a_checkpoint_the_node_loads(cohort: Path, trained: tuple[Path, dict]) -> None:
    out, summary = trained
    (ckpt_path,) = summary["checkpoints"]
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.family.name == "mmdlm"
    assert ckpt.temperature is None  # one float cannot calibrate three tasks ...
    temps = json.loads(json.dumps(torch.load(ckpt_path, weights_only=True)["extra"]))["temperatures"]
    assert set(temps) == {"grade", "idh", "1p19q"} and all(t > 0 for t in temps.values())  # ... extra can
    result = json.loads((out / "fold0" / "result.json").read_text())
    assert set(result["stage1"]) == {"T1CE", "T2", "FLAIR"}
    assert all(r["train_slices"] > 0 and r["best_epoch"] == 1 for r in result["stage1"].values())
    assert 1 <= result["stage3"]["best_epoch"] <= 2
    for stage in ("stage1-T1CE", "stage1-T2", "stage1-FLAIR", "stage3-mil"):
        assert (out / "fold0" / stage / "log.csv").exists()
    case = read_dataset(cohort)[0]
    pre = apply_spec(ckpt.spec, {r: case.images[r] for r in ckpt.input_roles})
    pred = ckpt.family.predict(ckpt.model, to_batch([pre], ckpt.input_roles))
    assert set(pred.probabilities) == {"grade", "idh", "1p19q"}
    assert pred.explanations["key_slices/T1CE"].shape == (1, 3)


def test_stage1_changes_the_extractors_and_stage3_only_the_head(cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("mmdlm", sets=TINY_SETS)
    cases = read_dataset(cohort)
    spec = FAMILY.spec_for(dict(cfg["model"]))
    cache = VolumeCache(spec, tmp_path / "cache")
    tumour = mmdlm._tumour_map(cases, spec, cache, "tumour", False)
    assert any(t is not None and t.any() for t in tumour.values())
    work = mmdlm._Split(cfg, _options(), cache, spec, cases[:8], cases[8:10], cases[10:], 0, tmp_path / "f",
                        "k", tumour)
    model = FAMILY.build(dict(cfg["model"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    work.stage1(model)
    after1 = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(before[k], after1[k]) for k in before if k.startswith("extractors.T2."))
    assert all(torch.equal(before[k], after1[k]) for k in before if not k.startswith("extractors."))
    feats, masks = work.extract(model)
    assert set(feats) == {c.case_id for c in cases}
    f = feats[cases[0].case_id]["FLAIR"]
    assert f.shape == (8, model.feature_dim)
    assert torch.all(f[~masks[cases[0].case_id]] == 0)  # padding positions never computed
    work.stage3(model, feats, masks)
    after3 = model.state_dict()
    assert all(torch.equal(after1[k], after3[k]) for k in after1 if k.startswith("extractors."))
    assert any(not torch.equal(after1[k], after3[k]) for k in after1 if k.startswith("heads."))


def test_an_all_missing_1p19q_batch_gives_zero_1p19q_loss(cohort: Path) -> None:
    cfg = load_config("mmdlm", sets=TINY_SETS)
    cases = read_dataset(cohort)
    loss = mmdlm._loss(cfg, cases)
    logits = {t: torch.randn(4, requires_grad=True) for t in ("grade", "idh", "1p19q")}
    targets = {"grade": torch.tensor([1, 0, 1, 0]), "idh": torch.tensor([0, -1, 1, 1]),
               "1p19q": torch.tensor([-1, -1, -1, -1])}
    total, parts = loss(logits, targets)
    assert float(parts["1p19q"].detach()) == 0.0
    total.backward()
    assert torch.all(logits["1p19q"].grad == 0)
    # the IDH-wildtype rule: a known 1p/19q label of an IDH-wildtype case does not count either
    masked = mmdlm._masked(loss, {"grade": torch.tensor([1, 0]), "idh": torch.tensor([0, 1]),
                                  "1p19q": torch.tensor([0, 1])})
    assert masked["1p19q"].tolist() == [-1, 1]


def test_report_tables_and_figures(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    md = (out / "report" / "mmdlm.md").read_text(encoding="utf-8")
    assert "| Model | Data | Grade AUC | IDH AUC | 1p/19q AUC |" in md
    assert "MMDLM | T1CE+T2+FLAIR |" in md
    assert "Departures from the paper" in md
    tasks_md = (out / "report" / "mmdlm_tasks.md").read_text(encoding="utf-8")
    assert "MMDLM grade | T1CE+T2+FLAIR" in tasks_md and "MMDLM IDH" in tasks_md
    for name in ("mmdlm.csv", "mmdlm_grade_roc_pr.png", "mmdlm_idh_roc_pr.png", "mmdlm_reliability.png",
                 "mmdlm_predictions.json"):
        assert (out / "report" / name).stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["protocol"] == "mmdlm"  # what the CLI reads
    split = json.loads((out / "splits.json").read_text())
    assert split["scheme"] == "kfold"
    fold = split["splits"][0]
    result = json.loads((out / "fold0" / "result.json").read_text())
    assert set(result["test_pred"]["case_ids"]) == set(fold["test_ids"])
    assert not set(fold["test_ids"]) & (set(fold["train_ids"]) | set(fold["val_ids"]))
    # the rule's mask travels with the predictions: IDH-wildtype cases never count for 1p/19q
    tp = result["test_pred"]
    idh = np.asarray(tp["idh"]["y"])
    assert not np.any(np.asarray(tp["1p19q"]["counted"]) & (idh == 0))


def test_resume_and_evaluate(cohort: Path, trained: tuple[Path, dict]) -> None:
    out, summary = trained
    mtime = Path(summary["checkpoints"][0]).stat().st_mtime_ns
    again = mmdlm.run(load_config("mmdlm", sets=TINY_SETS), data_dir=cohort, out_dir=out, options=_options())
    assert again["table_markdown"] == summary["table_markdown"]
    assert Path(again["checkpoints"][0]).stat().st_mtime_ns == mtime
    assert mmdlm.evaluate(out)["table_markdown"] == summary["table_markdown"]


def test_bad_configs_are_clear_errors(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stage1.slices"):
        mmdlm.run(load_config("mmdlm", sets=[*TINY_SETS, 'stage1.slices="tumor"']), data_dir=cohort,
                  out_dir=tmp_path / "a", options=_options())
    with pytest.raises(ConfigError, match="one_p19q_eval"):
        mmdlm.run(load_config("mmdlm", sets=[*TINY_SETS, 'protocol.one_p19q_eval="all"']), data_dir=cohort,
                  out_dir=tmp_path / "b", options=_options())
    with pytest.raises(ConfigError, match="task_weights"):
        mmdlm._loss(load_config("mmdlm", sets=["loss.task_weights=[1.0]"]), [])
