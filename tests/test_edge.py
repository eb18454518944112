"""The listener answers every C-STORE, whatever goes wrong, and leaves no temporary file behind (issue 14).

Each test reproduces a failure seen against a running ``dicomnode serve``:
a command set pynetdicom cannot turn into a request (no answer at all), a
data set that stalls or is cut off (its file stayed in ``spool/tmp``), a disk
that fills while a data set streams in (no status, files left), a series UID
under two studies (0xA700, "retry later", forever), and a data set not
encoded in its transfer syntax (acknowledged, then misread).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ

from conftest import need
from nodeutil import MR, NodeProcess, associate, mr_dataset, store, wait_until

from dicomnode.assemble.completion import Assembler
from dicomnode.config import Settings
from dicomnode.dicom.scp import StorageSCP
from dicomnode.index.studies import Index
from dicomnode.spool import Spool
from dicomnode.dicom.status import (
    MISSING_OR_INVALID_UID,
    OUT_OF_RESOURCES,
    SERIES_IN_OTHER_STUDY,
    SUCCESS,
    TRANSFER_SYNTAX_MISMATCH,
    is_permanent,
)


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "data").start()
    try:
        yield n
    finally:
        n.stop()


def tmp_files(node: NodeProcess) -> list[Path]:
    return sorted((node.data_dir / "spool" / "tmp").glob("*"))


def encode(ds: Dataset) -> bytes:
    """The data set as a sender puts it on the wire (explicit VR little endian, no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def send_fragments(assoc: Any, command: dict[str, Any], data: bytes, *, complete: bool = True,
                   pdu: int = 16384) -> Any:
    """Send one C-STORE-RQ built by hand (so its command set can be what pynetdicom's own API refuses to build).

    ``complete=False`` sends the command and all but the last data set
    fragment: a peer that stalls (or is cut off) in the middle of a data set.
    Returns the response primitive, or None when not waiting for one.
    """
    msg = C_STORE_RQ()
    cs = msg.command_set
    cs.AffectedSOPClassUID = command["sop_class"]
    cs.CommandField = 0x0001
    cs.MessageID = command.get("message_id", 1)
    cs.Priority = 0
    cs.CommandDataSetType = 0x0000
    cs.AffectedSOPInstanceUID = command["sop_instance"]
    msg.data_set = io.BytesIO(data)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == command["sop_class"])
    fragments = list(msg.encode_msg(cx.context_id, pdu))
    if not complete:
        fragments = fragments[:-1]
    assoc._reactor_checkpoint.clear()  # as send_c_store does: this thread reads the response, not the reactor
    try:
        wait_until(lambda: assoc._is_paused, timeout=60, every=0.001, what="reactor paused")
        for p in fragments:
            assoc.dul.send_pdu(p)
        if not complete:
            return None
        _, rsp = assoc.dimse.get_msg(block=True)
        return rsp
    finally:
        assoc._reactor_checkpoint.set()


def events(node: NodeProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in json.loads(node.cli("events", "--json").stdout) if e["kind"] == kind]


def test_invalid_command_uid_gets_c212_and_the_association_goes_on(node: NodeProcess) -> None:
    """Affected SOP Instance UID of 70 characters: answered 0xC212 (was: no response), its file removed."""
    study, series = generate_uid(), generate_uid()
    long_uid = "1.2." + "3" * 66
    bad = mr_dataset(study, series, sop_uid=long_uid)
    good = mr_dataset(study, series)
    assoc = associate(node.port)
    assert assoc.is_established
    try:
        rsp = send_fragments(assoc, {"sop_class": MR, "sop_instance": long_uid}, encode(bad))
        assert rsp is not None and int(rsp.Status) == MISSING_OR_INVALID_UID
        assert is_permanent(int(rsp.Status))
        assert "70 characters" in str(rsp.ErrorComment)
        assert int(assoc.send_c_store(good).Status) == SUCCESS  # the same association goes on
    finally:
        assoc.release()
    wait_until(lambda: not tmp_files(node), timeout=120, what="spool/tmp empty")
    refused = wait_until(lambda: events(node, "store_refused"), timeout=120, what="store_refused event")
    assert any("0xC212" in e["message"] and "70 characters" in e["message"] for e in refused)
    assert long_uid not in node.log()  # lengths are reported, never the value
    assert len(node.spool_files()) == 1


@pytest.mark.parametrize("ending", ["abort", "drop"])
def test_a_data_set_cut_off_mid_stream_leaves_no_temporary_file(node: NodeProcess, ending: str) -> None:
    """The peer aborts (or its connection drops) with a data set half sent: the partial file goes at once."""
    ds = mr_dataset(generate_uid(), generate_uid(), rows=128, cols=128)
    assoc = associate(node.port)
    assert assoc.is_established
    send_fragments(assoc, {"sop_class": MR, "sop_instance": str(ds.SOPInstanceUID)}, encode(ds),
                   complete=False, pdu=4096)
    wait_until(lambda: tmp_files(node), timeout=120, what="the node streaming the data set into spool/tmp")
    if ending == "abort":
        assoc.abort()
    else:
        assoc.dul.socket.close()  # TCP gone without an A-ABORT
        assoc.kill()
    wait_until(lambda: not tmp_files(node), timeout=120, what="spool/tmp empty after the association ended")
    assert node.spool_files() == []
    assert store(node.port, mr_dataset(generate_uid(), generate_uid())) == [SUCCESS]  # the node is fine


def test_series_uid_under_a_second_study_is_a_permanent_refusal(node: NodeProcess) -> None:
    series = generate_uid()
    first = mr_dataset(generate_uid(), series)
    second = mr_dataset(generate_uid(), series)
    assert store(node.port, first, second) == [SUCCESS, SERIES_IN_OTHER_STUDY]
    assert is_permanent(SERIES_IN_OTHER_STUDY)
    refused = wait_until(lambda: events(node, "store_refused"), timeout=120, what="store_refused event")
    assert any("0xC215" in e["message"] and "another study" in e["message"] for e in refused)
    assert str(series) not in node.log()
    assert len(node.spool_files()) == 1
    doc = node.status()
    assert len(doc["studies"]) == 1  # the refused instance's study was not created either


def test_data_set_not_in_its_transfer_syntax_is_refused(node: NodeProcess, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Implicit VR bytes sent under Explicit VR Little Endian: pydicom would read them anyway; the node refuses."""
    ds = mr_dataset(generate_uid(), generate_uid())
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    meta = Dataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta)  # type: ignore[arg-type]
    path = tmp_path / "mislabelled.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue())
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are on disk
    assert store(node.port, path) == [TRANSFER_SYNTAX_MISMATCH]
    assert node.spool_files() == []
    wait_until(lambda: not tmp_files(node), timeout=120, what="spool/tmp empty")


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs: a disk that really fills (ENOSPC), mounted for this test only (root only)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    can_mount = os.geteuid() == 0 and shutil.which("mount") is not None
    if can_mount:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)],
                            capture_output=True).returncode == 0
    else:
        ok = False
    need(ok, "mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_filling_mid_stream_answers_a700_and_leaves_nothing(small_disk: Path, tmp_path: Path) -> None:
    """The watermark is passed, then the disk fills while a data set streams in: every store gets a status.

    Seen before: 44 of 80 stores got no status (ENOSPC in the reactor
    thread) and partial files stayed. The index lives on another disk here so
    the test is about the spool.
    """
    node = NodeProcess(small_disk / "data", min_free_disk_mb=1,
                       database_url=f"sqlite:///{tmp_path / 'index.db'}")
    node.log_path = tmp_path / "node.log"  # not on the disk that fills
    node.start()
    try:
        study, series = generate_uid(), generate_uid()
        # 8 MiB each: four or so fit in 40 MiB, the one that crosses the end meets ENOSPC mid-stream
        datasets = [mr_dataset(study, series, rows=2048, cols=2048) for _ in range(8)]
        statuses = store(node.port, *datasets)
        assert len(statuses) == len(datasets)  # every C-STORE answered, none left to the sender's timeout
        assert set(statuses) <= {SUCCESS, OUT_OF_RESOURCES}, statuses
        assert SUCCESS in statuses and OUT_OF_RESOURCES in statuses, statuses
        assert tmp_files(node) == []
        stored = len(node.spool_files())
        assert stored == statuses.count(SUCCESS)
        refused = events(node, "store_refused")
        assert any("0xA700" in e["message"] and "disk" in e["message"] for e in refused), refused
    finally:
        node.stop()



def test_a_failing_assembly_pass_backs_off_with_one_traceback(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """An index that fails every pass (a full disk said "database or disk is full" 71 times) logs one traceback.

    The repeats are one line each with their count, at growing intervals, and
    the recovery is logged once.
    """
    db = tmp_path / "index.db"
    settings = Settings(data_dir=str(tmp_path / "data"), database_url=f"sqlite:///{db}", assembly_poll_s=0.05)
    index = Index(settings.database_url or "")
    with sqlite3.connect(db) as c:  # the table every pass reads is gone: each pass fails for real
        c.execute("ALTER TABLE study_versions RENAME TO study_versions_away")
    assembler = Assembler(settings, index, Spool(settings.data_path))
    caplog.set_level(logging.INFO, logger="dicomnode.assemble.completion")
    assembler.start()
    try:
        wait_until(lambda: sum("failed again" in r.getMessage() for r in caplog.records) >= 3, timeout=120,
                   what="three repeated failures")
        with sqlite3.connect(db) as c:
            c.execute("ALTER TABLE study_versions_away RENAME TO study_versions")
        wait_until(lambda: any("work again" in r.getMessage() for r in caplog.records), timeout=180,
                   what="recovery logged")
    finally:
        assembler.stop()
        index.close()
    mine = [r for r in caplog.records if r.name == "dicomnode.assemble.completion"]
    assert sum(r.exc_info is not None for r in mine) == 1
    repeats = [r.getMessage() for r in mine if "failed again" in r.getMessage()]
    assert repeats[0] == "assembly pass failed again (2 in a row): OperationalError"
    # backing off: at a 0.05 s poll, unthrottled passes would have logged hundreds of lines by now
    assert len(repeats) < 20


def test_every_clean_release_brings_completion_forward(tmp_path: Path) -> None:
    """The peer closes its socket on reading the A-RELEASE-RP; the node must still count the release.

    The connection-closed event could run before the released event and drop
    the association's studies, so about half of the studies Orthanc sent
    completed on the quiet period instead (seen while hardening the suite).
    The quiet period here is far longer than the bound, so only a counted
    release can complete these studies in time.
    """
    node = NodeProcess(tmp_path / "data", quiet_period_s=3600, release_quiet_s=1).start()
    try:
        studies = [generate_uid() for _ in range(12)]
        for study in studies:  # one association each, released cleanly by store()
            assert store(node.port, mr_dataset(study, generate_uid())) == [SUCCESS]

        def completed(doc: dict[str, Any]) -> dict[str, str]:
            return {st["study_instance_uid"]: st["versions"][0].get("complete_reason") for st in doc["studies"]
                    if st["versions"][0]["state"] != "receiving"}

        doc = node.wait_for(lambda d: len(completed(d)) == len(studies), timeout=600)
        assert set(completed(doc).values()) == {"association_released"}
    finally:
        node.stop()


def test_the_listener_leaves_the_process_temp_folder_alone(tmp_path: Path) -> None:
    """Data sets stream into the spool's tmp through the association's guard, not a process-wide tempfile.tempdir.

    Setting tempfile.tempdir sent everything else in the process there too:
    under a long pytest path, multiprocessing's forkserver socket then failed
    with "AF_UNIX path too long" in a later test.
    """
    before = tempfile.gettempdir()
    settings = Settings(data_dir=str(tmp_path / "data"), port=0, ae_title="TESTNODE", min_free_disk_mb=1)
    index = Index(f"sqlite:///{tmp_path / 'index.db'}")
    spool = Spool(settings.data_path)
    scp = StorageSCP(settings, index, spool)
    scp.start()
    try:
        assert tempfile.gettempdir() == before
        ds = mr_dataset(generate_uid(), generate_uid(), rows=128, cols=128)
        assoc = associate(scp.port)
        assert assoc.is_established
        send_fragments(assoc, {"sop_class": MR, "sop_instance": str(ds.SOPInstanceUID)}, encode(ds),
                       complete=False, pdu=4096)
        wait_until(lambda: list(spool.tmp.glob("*.dcm")), timeout=120, what="the stream in spool/tmp")
        assoc.abort()
        wait_until(lambda: not list(spool.tmp.glob("*.dcm")), timeout=120, what="spool/tmp empty")
    finally:
        scp.stop()
        index.close()
