"""The node honours a site rules file (sequence_rules_file), and refuses to start on a bad one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom.uid import generate_uid

from nodeutil import RELEASE_COMPLETES, REPO, NodeProcess, mr_dataset, store


def test_site_rule_overrides_the_heuristics(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nmatch = "series_description"\npattern = "(?i)^research_t2"\nrole = "OTHER"\n')
    # completes on store()'s clean release: a 1 s quiet period could end inside a stalled association
    node = NodeProcess(tmp_path / "data", sequence_rules_file=str(rules), **RELEASE_COMPLETES).start()
    try:
        study, overridden, plain = generate_uid(), generate_uid(), generate_uid()
        datasets = []
        for series, desc in ((overridden, "research_t2_tse_tra"), (plain, "t2_tse_tra")):
            for k in range(12):
                ds = mr_dataset(study, series, description=desc, instance=k + 1)
                ds.RepetitionTime, ds.EchoTime = 5000, 100
                ds.ScanningSequence, ds.MRAcquisitionType = "SE", "2D"
                ds.ImagePositionPatient = [0, 0, 5.0 * k]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.SliceThickness, ds.PixelSpacing = 5, [1, 1]
                datasets.append(ds)
        assert set(store(node.port, *datasets)) == {0}
        doc = node.wait_for(lambda d: d["studies"] and d["studies"][0]["versions"][0]["state"] == "complete")
        roles = {s["series_instance_uid"]: s for s in doc["studies"][0]["versions"][0]["series"]}
        assert roles[overridden]["role"] == "OTHER"
        assert any("site rule" in e for e in roles[overridden]["evidence"])
        assert roles[plain]["role"] == "T2", roles[plain]
    finally:
        node.stop()


def test_bad_rules_file_stops_the_node_with_a_clear_message(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nmatch = "series_description"\npattern = "("\nrole = "T9"\n')
    node = NodeProcess(tmp_path / "data", sequence_rules_file=str(rules))
    r = subprocess.run([sys.executable, "-m", "dicomnode", "serve"], env=node.env(), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "cannot start" in r.stderr and "rules.toml" in r.stderr and "Traceback" not in r.stderr
