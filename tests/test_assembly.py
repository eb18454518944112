"""Study assembly across associations, study versions, and survival of kill -9."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import dcmtk_tool
from nodeutil import NODE_AET, NodeProcess, associate, mr_dataset, store


def versions(doc: dict) -> list[dict]:
    return [v for st in doc["studies"] for v in st["versions"]]


def test_study_over_three_associations_is_one_version_then_late_series_is_version_2(tmp_path: Path) -> None:
    # quiet period 20 s: far longer than the 2 s gaps between associations and a status call on a loaded
    # machine (a 5 s one was overtaken at load ~7), so "still receiving" does not hang on a few seconds
    node = NodeProcess(tmp_path / "data", quiet_period_s=20).start()
    try:
        study = generate_uid()
        series = [generate_uid() for _ in range(4)]
        for i in range(3):
            ds = [mr_dataset(study, series[i], instance=k, description=["t1_mprage", "t2_tse", "flair"][i]) for k in range(3)]
            assert store(node.port, *ds) == [0, 0, 0]
            if i < 2:
                time.sleep(2)
        time.sleep(1)
        assert [v["state"] for v in versions(node.status())] == ["receiving"]
        doc = node.wait_for(lambda d: [v["state"] for v in versions(d)] == ["complete"], timeout=120)
        (v1,) = versions(doc)
        assert v1["complete_reason"] == "quiet_period"
        assert len(v1["series"]) == 3 and all(s["role"] for s in v1["series"])
        # a series arriving after completion opens version 2, which covers the whole study
        assert store(node.port, mr_dataset(study, series[3])) == [0]
        doc = node.wait_for(lambda d: [v["state"] for v in versions(d)] == ["complete", "complete"], timeout=120)
        v1, v2 = versions(doc)
        assert v2["version"] == 2 and v2["new_instances"] == 1
        assert len(v2["series"]) == 4 and len(v1["series"]) == 3
        assert len(doc["studies"]) == 1
    finally:
        node.stop()


def test_clean_release_brings_completion_forward_but_abort_does_not(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", quiet_period_s=30, release_quiet_s=1).start()
    try:
        released, aborted = generate_uid(), generate_uid()
        assert store(node.port, mr_dataset(released, generate_uid())) == [0]  # store() releases cleanly
        assoc = associate(node.port)
        assert int(assoc.send_c_store(mr_dataset(aborted, generate_uid())).Status) == 0
        assoc.abort()
        doc = node.wait_for(lambda d: any(v["state"] == "complete" for v in versions(d)), timeout=10)
        time.sleep(2)
        doc = node.status()
        states = {st["study_instance_uid"]: st["versions"][0] for st in doc["studies"]}
        assert states[released]["state"] == "complete"
        assert states[released]["complete_reason"] == "association_released"
        assert states[aborted]["state"] == "receiving"
    finally:
        node.stop()


def test_kill9_during_storescu_loses_nothing_acknowledged(tmp_path: Path) -> None:
    storescu = dcmtk_tool("storescu")
    src = tmp_path / "src"
    src.mkdir()
    study, series = generate_uid(), generate_uid()
    for k in range(400):
        mr_dataset(study, series, rows=128, cols=128, instance=k).save_as(src / f"{k:04d}.dcm", enforce_file_format=True)
    node = NodeProcess(tmp_path / "data", quiet_period_s=3).start()
    proc = subprocess.Popen(
        [storescu, "-v", "-aet", "SENDER", "-aec", NODE_AET, "127.0.0.1", str(node.port), *sorted(map(str, src.iterdir()))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # kill the node while instances are flowing
    deadline = time.time() + 30
    while time.time() < deadline and len(node.spool_files()) < 40:
        time.sleep(0.02)
    node.kill9()
    out, _ = proc.communicate(timeout=60)
    # storescu -v logs each response; the Success ones are what the PACS would consider delivered
    acked = _acknowledged_files(out)
    assert 0 < len(acked) < 400, out[-2000:]
    node2 = NodeProcess(node.data_dir, port=node.port, quiet_period_s=3).start()
    try:
        doc = node2.wait_for(lambda d: [v["state"] for v in versions(d)] == ["complete"], timeout=20)
        stored = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in node2.spool_files()}
        acked_uids = {dcmread(src / name, stop_before_pixels=True).SOPInstanceUID for name in acked}
        assert acked_uids <= stored
        assert doc["studies"][0]["instances"] == len(stored)
    finally:
        node2.stop()


def _acknowledged_files(storescu_verbose: str) -> list[str]:
    """File names storescu reported as stored with status Success."""
    acked, current = [], None
    for line in storescu_verbose.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip()).name
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked
