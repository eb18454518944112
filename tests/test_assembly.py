"""Study assembly across associations, study versions, and survival of kill -9."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import dcmtk_tool
from nodeutil import NODE_AET, NodeProcess, associate, epoch, mr_dataset, store, wait_until


def versions(doc: dict) -> list[dict]:
    return [v for st in doc["studies"] for v in st["versions"]]


def test_study_over_three_associations_is_one_version_then_late_series_is_version_2(tmp_path: Path) -> None:
    # The gaps between the associations (2 s, plus the stores themselves) must stay under the quiet period
    # whatever the load: 30 s. "Not complete before the quiet period" is checked against the index's own
    # timestamps, never against a wall-clock sleep: a status read taken less than the quiet period after the
    # last instance must say "receiving" (a read taken later proves nothing and is not asserted on), and the
    # completion must be recorded at least the quiet period after the last instance.
    quiet = 30
    node = NodeProcess(tmp_path / "data", quiet_period_s=quiet).start()
    try:
        study = generate_uid()
        series = [generate_uid() for _ in range(4)]
        for i in range(3):
            ds = [mr_dataset(study, series[i], instance=k, description=["t1_mprage", "t2_tse", "flair"][i]) for k in range(3)]
            assert store(node.port, *ds) == [0, 0, 0]
            if i < 2:
                time.sleep(2)  # a pause between associations (the stimulus, not a wait for state)
        doc = node.status()
        read_by = time.time()  # the status read committed no later than this
        (v1,) = versions(doc)
        if read_by < epoch(v1["last_instance_at"]) + quiet:
            assert v1["state"] == "receiving", v1
        doc = node.wait_for(lambda d: [v["state"] for v in versions(d)] == ["complete"])
        (v1,) = versions(doc)
        assert v1["complete_reason"] == "quiet_period"
        assert epoch(v1["completed_at"]) - epoch(v1["last_instance_at"]) >= quiet - 0.002, v1  # ms-rounded times
        # one version: all three associations' instances and series in it
        assert v1["new_instances"] == 9 and doc["studies"][0]["instances"] == 9
        assert len(v1["series"]) == 3 and all(s["role"] for s in v1["series"])
        # a series arriving after completion opens version 2, which covers the whole study
        assert store(node.port, mr_dataset(study, series[3])) == [0]
        doc = node.wait_for(lambda d: [v["state"] for v in versions(d)] == ["complete", "complete"])
        v1, v2 = versions(doc)
        assert v2["version"] == 2 and v2["new_instances"] == 1
        assert len(v2["series"]) == 4 and len(v1["series"]) == 3
        assert len(doc["studies"]) == 1
    finally:
        node.stop()


def test_clean_release_brings_completion_forward_but_abort_does_not(tmp_path: Path) -> None:
    # The aborted study is sent FIRST, then the released one: the assembler pass that completes the released
    # study (due 1 s after its release) would also find the aborted one due if an abort counted as a release
    # (its "release" would be older), so the snapshot taken once the released one is complete needs no sleep.
    # A quiet period of 120 s keeps the aborted one receiving far beyond that snapshot even on a loaded
    # machine; should the snapshot come later still, the aborted one may only have completed by its quiet
    # period, and the index's timestamps must say so.
    quiet = 120
    node = NodeProcess(tmp_path / "data", quiet_period_s=quiet, release_quiet_s=1).start()
    try:
        released, aborted = generate_uid(), generate_uid()
        assoc = associate(node.port)
        assert int(assoc.send_c_store(mr_dataset(aborted, generate_uid())).Status) == 0
        assoc.abort()
        assert store(node.port, mr_dataset(released, generate_uid())) == [0]  # store() releases cleanly

        def state_of(doc: dict) -> dict[str, dict]:
            return {st["study_instance_uid"]: st["versions"][0] for st in doc["studies"]}

        node.wait_for(lambda d: state_of(d).get(released, {}).get("state") == "complete")
        states = state_of(node.status())
        assert states[released]["state"] == "complete"
        assert states[released]["complete_reason"] == "association_released"
        a = states[aborted]
        if a["state"] != "receiving":
            assert a["complete_reason"] == "quiet_period", a
            assert epoch(a["completed_at"]) - epoch(a["last_instance_at"]) >= quiet - 0.002, a
    finally:
        node.stop()


def test_kill9_during_storescu_loses_nothing_acknowledged(tmp_path: Path) -> None:
    storescu = dcmtk_tool("storescu")
    src = tmp_path / "src"
    src.mkdir()
    study, series = generate_uid(), generate_uid()
    for k in range(400):
        mr_dataset(study, series, rows=128, cols=128, instance=k).save_as(src / f"{k:04d}.dcm", enforce_file_format=True)
    # while storescu sends, a stall on a loaded machine must not complete a part of the study: 120 s;
    # after the restart nothing more arrives, so a short quiet period there only makes the test quicker
    node = NodeProcess(tmp_path / "data", quiet_period_s=120).start()
    proc = subprocess.Popen(
        [storescu, "-v", "-aet", "SENDER", "-aec", NODE_AET, "127.0.0.1", str(node.port), *sorted(map(str, src.iterdir()))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # kill the node while instances are flowing (storescu sends all 400 only if the node is left alone)
    wait_until(lambda: len(node.spool_files()) >= 40 or proc.poll() is not None, every=0.02,
               what="40 instances in the spool")
    assert proc.poll() is None, "storescu finished before the node could be killed"
    node.kill9()
    out, _ = proc.communicate(timeout=300)
    # storescu -v logs each response; the Success ones are what the PACS would consider delivered
    acked = _acknowledged_files(out)
    assert 0 < len(acked) < 400, out[-2000:]
    node2 = NodeProcess(node.data_dir, port=node.port, quiet_period_s=3).start()
    try:
        doc = node2.wait_for(lambda d: [v["state"] for v in versions(d)] == ["complete"])
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
