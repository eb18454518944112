"""``dicomnode demo`` on a fresh data folder: trains (tiny) demo checkpoints, grades a synthetic study, shows it.

It also says what it is doing while it does it (a user waited 32 silent minutes on a busy machine): a line
when each long step starts and ends, per model a line per epoch with loss and validation AUC (stderr is a
pipe here, as in a log), the instances sent, what the node is doing while the report is awaited, and at
the end where everything is.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydicom import dcmread

REPO = Path(__file__).resolve().parent.parent

STEP_RE = r"{name}: done in \d+(?:\.\d)? s|{name}: done in \d+ min \d\d s"


def _done(out: str, name: str) -> bool:
    return re.search(STEP_RE.format(name=re.escape(name)), out) is not None


def _where(out: str) -> dict[str, list[str]]:
    """The closing "Where everything is:" block, label -> values (a label may carry several lines)."""
    assert "\nWhere everything is:\n" in out, out[-3000:]
    block = out.split("\nWhere everything is:\n", 1)[1]
    rows: dict[str, list[str]] = {}
    label = ""
    for line in block.splitlines():
        if not line.startswith("  "):  # the block ends with the dashboard's own line
            break
        m = re.fullmatch(r"  (?:(\S[^:]*):)?\s+(\S.*)", line)
        assert m, f"not a row of the block: {line!r}"
        label = m.group(1) or label
        rows.setdefault(label, []).append(m.group(2))
    return rows


def _check_where(out: str, demo: Path, *, trained: bool) -> dict[str, list[str]]:
    rows = _where(out)
    for label in ("report (text)", "report (HTML)", "summary image (PNG)", "SR as the PACS got it", "node data dir",
                  "node log", "checkpoints", "training figures"):
        assert label in rows, (label, rows)
    for label, values in rows.items():
        for v in values:
            if v.startswith("/"):
                assert Path(v).exists(), (label, v)
    assert Path(rows["report (text)"][0]) == demo / "report.txt"
    assert "Research use only" in Path(rows["report (text)"][0]).read_text()
    assert Path(rows["node data dir"][0]) == demo / "node-data"
    assert Path(rows["node log"][0]).stat().st_size > 0  # the node's own log lines, not the terminal's
    figures = {Path(v).name for v in rows["training figures"][1:]}
    assert {"fs3dcnn-roc-pr.png", "promptnet-roc-pr.png", "mmdlm-roc-pr.png", "mmdlm-reliability.png"} <= figures
    # the node's HTTP side ran during the demo, and the demo says it answered rather than assuming it
    m = re.search(r"^dashboard: http://127\.0\.0\.1:(\d+)/\n  \(answered HTTP 200 while the demo's node ran", out,
                  flags=re.M)
    assert m, out[-2000:]
    assert re.search(rf"starting the node: done in .*; dashboard at http://127\.0\.0\.1:{m.group(1)}/\)", out)
    if trained:
        assert Path(rows["training runs"][0]) == demo / "training"
    return rows


def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dicomnode", "demo", "--quick", "--workdir", str(tmp_path / "demo")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out, err = r.stdout, r.stderr
    assert "NOT for clinical use" in out  # the demo checkpoints say what they are
    assert "Time per stage" in out and "infer" in out and "from send to report in PACS" in out
    assert "Research use only" in out  # the SR's disclaimer, printed from the received SR
    # every long step opens and closes with its time
    for step in ("training", "starting the node", "starting the local receiving PACS", "sending the study to the node",
                 "waiting for the report", "reading the report the PACS received"):
        assert re.search(rf"^{re.escape(step)} \.\.\.", out, flags=re.M), (step, out[:3000])
        assert _done(out, step), (step, out[:3000])
    m = re.search(r"sending the study to the node: done in .* \(sent (\d+)/(\d+) instances\)", out)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 50, out
    # while waiting: what the node is doing, from its index (the first poll always says it)
    doing = re.findall(r"^  \d+(?:\.\d)? s: (.+)$", out.split("waiting for the report ...", 1)[1], flags=re.M)
    assert doing and any(d.startswith("running ") for d in doing), out
    # training: per model one line per epoch with its loss and validation AUC (stderr is not a terminal)
    for model in ("fs r0", "adaptive r0", "fold0 stage 3 MIL"):
        assert re.search(rf"{model}: epoch 1/\d+ train loss \d+\.\d{{4}} val loss \d+\.\d{{4}} "
                         rf"val AUC (?:\d\.\d{{3}}|n/a)", err), (model, err[-3000:])
    demo = tmp_path / "demo"
    rows = _check_where(out, demo, trained=True)
    received = sorted((demo / "pacs").glob("*.dcm"))
    modalities = sorted(dcmread(p, stop_before_pixels=True).Modality for p in received)
    assert modalities == ["OT", "SR"]
    sr = dcmread(next(p for p in received if p.name.startswith("SR")))
    assert Path(rows["SR as the PACS got it"][0]) == next(p for p in received if p.name.startswith("SR"))
    study = next((demo / "study").rglob("*.dcm"))
    assert sr.StudyInstanceUID == dcmread(study, stop_before_pixels=True).StudyInstanceUID
    assert (demo / "report.html").stat().st_size > 1000
    assert (demo / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the checkpoints instead of training again
    r2 = subprocess.run([sys.executable, "-m", "dicomnode", "demo", "--quick", "--workdir", str(tmp_path / "demo")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "Using 3 checkpoint(s)" in r2.stdout
    assert not _done(r2.stdout, "training") and " epoch " not in r2.stderr
    _check_where(r2.stdout, demo, trained=True)
