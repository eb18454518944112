"""benchmarks/models.py keeps running (a quick smoke run; the figures themselves are not asserted)."""
from __future__ import annotations

from pathlib import Path


def test_models_benchmark_quick_smoke_run(tmp_path: Path) -> None:
    """``benchmarks/models.py --quick`` still runs end to end for one family, so it does not rot."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "models.py"), "--quick", "--families", "fs3dcnn",
         "--batches", "1", "--runs", "1", "--predict", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["family"] == "fs3dcnn" and row["params"] > 0 and row["latency_s"] > 0
    assert row["input_shape"] == [16, 16, 16] and "predict_s" in row
    assert "fs3dcnn" in proc.stdout and "params" in proc.stdout
