"""``python -m training``: generate, train, evaluate, export end to end in a subprocess; clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.checkpoint import load_checkpoint
from training import cli
from training import protocols as protocols_pkg

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "--set", "model.input_shape=[20,20,16]", "--set", "model.widths=[4,4,8]", "--set", "model.stem_width=4",
    "--set", "model.fc_hidden=[8,8]", "--set", "data.spacing=[9.6,9.6,9.75]", "--set", "train.epochs=1",
    "--set", "split.val_fraction=0.25",
]


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_generate_train_evaluate_export_end_to_end(tmp_path: Path) -> None:
    data, run, node = tmp_path / "cohort", tmp_path / "run", tmp_path / "node"
    g = _cli("generate", str(data), "--n-cases", "10", "--shape", "20", "20", "16", "--spacing", "9.6", "9.6", "9.75",
             "--hgg-fraction", "0.5", "--workers", "1")
    assert g.returncode == 0, g.stderr
    assert (data / "name_mapping.csv").exists() and len(list(data.glob("BraTS20_Training_*"))) == 10
    t = _cli("train", "promptnet", "--data", str(data), "--out", str(run), "--repeats", "1", "--rows", "fs", "adaptive",
             "--device", "cpu", "--threads", "1", *TINY)
    assert t.returncode == 0, t.stderr
    assert "| 3D CNN | FS-MRI |" in t.stdout and "| Adaptive PromptNet | NE-MRI |" in t.stdout
    assert "NE-only" not in t.stdout
    assert (run / "report" / "table1.csv").exists()
    e = _cli("evaluate", str(run))
    assert e.returncode == 0, e.stderr
    assert "| Adaptive PromptNet |" in e.stdout
    x = _cli("export", str(run), "--to", str(node))
    assert x.returncode == 0, x.stderr
    files = sorted(node.glob("*.pt"))
    assert [f.name for f in files] == ["promptnet-adaptive-r0.pt", "promptnet-fs-r0.pt"]
    assert {load_checkpoint(f).family.name for f in files} == {"fs3dcnn", "promptnet"}


def test_bad_data_is_one_clear_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("train", "promptnet", "--data", str(empty), "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_cli_errors_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "d"
    data.mkdir()
    assert cli.main(["train", "nosuch", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "unknown protocol 'nosuch'" in capsys.readouterr().err
    monkeypatch.setattr(protocols_pkg, "PROTOCOLS", (*protocols_pkg.PROTOCOLS, "notwritten"))
    assert cli.main(["train", "notwritten", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert "not available" in capsys.readouterr().err
    assert cli.main(["train", "promptnet", "--data", str(data), "--out", str(tmp_path / "r"),
                     "--set", "train.nope=1"]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    assert cli.main(["train", "promptnet", "--data", str(data), "--out", str(tmp_path / "r"), "--set", "oops"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--to", str(tmp_path / "n")]) == 2
    assert "no checkpoints.json" in capsys.readouterr().err
    (data / "x.txt").write_text("not a cohort")
    assert cli.main(["generate", str(data), "--n-cases", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
