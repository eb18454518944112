"""``dicomnode demo`` on a fresh data folder: trains (tiny) demo checkpoints, grades a synthetic study, shows it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

REPO = Path(__file__).resolve().parent.parent


def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dicomnode", "demo", "--quick", "--workdir", str(tmp_path / "demo")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "NOT for clinical use" in out  # the demo checkpoints say what they are
    assert "Time per stage" in out and "infer" in out and "from send to report in PACS" in out
    assert "Research use only" in out  # the SR's disclaimer, printed from the received SR
    demo = tmp_path / "demo"
    received = sorted((demo / "pacs").glob("*.dcm"))
    modalities = sorted(dcmread(p, stop_before_pixels=True).Modality for p in received)
    assert modalities == ["OT", "SR"]
    sr = dcmread(next(p for p in received if p.name.startswith("SR")))
    study = next((demo / "study").rglob("*.dcm"))
    assert sr.StudyInstanceUID == dcmread(study, stop_before_pixels=True).StudyInstanceUID
    assert (demo / "report.html").stat().st_size > 1000
    assert (demo / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the checkpoints instead of training again
    r2 = subprocess.run([sys.executable, "-m", "dicomnode", "demo", "--quick", "--workdir", str(tmp_path / "demo")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "Using 3 checkpoint(s)" in r2.stdout
