"""The listener against real associations on loopback: what is accepted, refused, rejected, survived."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from nodeutil import NODE_AET, NodeProcess, associate, mr_dataset, store
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import RawDataStorage

from dicomnode.dicom.shim import configure
from dicomnode.dicom.sop import MR_IMAGE_STORAGE, SECONDARY_CAPTURE_IMAGE_STORAGE
from dicomnode.spool import Spool


@pytest.fixture(autouse=True, scope="module")
def _send_files_as_they_are() -> None:
    """Files go out as they are on disk (truncated and garbage ones included): the node's pynetdicom settings."""
    configure()


@pytest.fixture
def node(tmp_path: Path):
    n = NodeProcess(tmp_path / "data", allowed_peers=["GOODSCU", "LOCALSCU@127.0.0.0/8", "FARSCU@192.0.2.7"]).start()
    yield n
    n.stop()


def test_echo_and_cli_echo(node: NodeProcess) -> None:
    assoc = associate(node.port)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    out = node.cli("echo", "127.0.0.1", str(node.port), "--aet", NODE_AET, "--calling", "GOODSCU")
    assert "status 0x0000" in out.stdout


def test_rejects_unknown_calling_and_wrong_called_ae(node: NodeProcess) -> None:
    bad_calling = associate(node.port, calling="STRANGER")
    assert bad_calling.is_rejected
    bad_called = associate(node.port, called="NOTTHENODE")
    assert bad_called.is_rejected
    # bound to a host we are not: rejected; bound to loopback: accepted
    assert associate(node.port, calling="FARSCU").is_rejected
    local = associate(node.port, calling="LOCALSCU")
    assert local.is_established
    local.release()
    log = node.log()
    assert "calling AE 'STRANGER' from 127.0.0.1 is not in allowed_peers" in log
    assert "called AE 'NOTTHENODE' is not ours" in log
    events = json.loads(node.cli("events", "--json").stdout)
    assert sum(e["kind"] == "association_rejected" for e in events) == 3


def test_store_is_durable_and_indexed_duplicates_counted(node: NodeProcess) -> None:
    study, series = generate_uid(), generate_uid()
    a = mr_dataset(study, series)
    b = mr_dataset(study, series, instance=2)
    assert store(node.port, a, b, a) == [0, 0, 0]
    doc = node.status()
    (st,) = doc["studies"]
    assert st["instances"] == 2 and st["duplicates"] == 1
    files = node.spool_files()
    assert len(files) == 2
    # stored as received, under names the node made up
    uids = {dcmread(f).SOPInstanceUID for f in files}
    assert uids == {a.SOPInstanceUID, b.SOPInstanceUID}
    assert all(a.SOPInstanceUID not in str(f) for f in files)


def test_non_image_objects_stored_not_for_grading(node: NodeProcess) -> None:
    study, series = generate_uid(), generate_uid()
    raw = Dataset()
    raw.SOPClassUID = RawDataStorage
    raw.SOPInstanceUID = generate_uid()
    raw.StudyInstanceUID, raw.SeriesInstanceUID = study, series
    raw.Modality = "MR"
    raw.file_meta = mr_dataset(study, series).file_meta
    raw.file_meta.MediaStorageSOPClassUID = RawDataStorage
    raw.file_meta.MediaStorageSOPInstanceUID = raw.SOPInstanceUID
    assert store(node.port, raw) == [0]
    assert len(node.spool_files()) == 1


def _raw_send(port: int, path: Path) -> int:
    """Send a file's bytes exactly as they are (pynetdicom's chunked send, set by ``configure``, does not re-encode)."""
    (status,) = store(port, path)
    return status


def test_hostile_and_malformed_datasets_are_refused_and_survived(node: NodeProcess, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    # 1. a SOP Instance UID that is a path
    evil = mr_dataset(study, series, sop_uid="../../x")
    (status,) = store(node.port, evil)
    assert 0xC000 <= status <= 0xCFFF
    # 2. a truncated dataset: pixel data declared longer than what follows
    good = mr_dataset(study, series, rows=64, cols=64)
    full = tmp_path / "full.dcm"
    good.save_as(full, enforce_file_format=True)
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(full.read_bytes()[:-3000])
    assert 0xC000 <= _raw_send(node.port, trunc) <= 0xCFFF
    # 3. garbage after a valid file meta header
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(full.read_bytes()[:132] + _file_meta_bytes(full) + os.urandom(4000))
    assert 0xC000 <= _raw_send(node.port, garbage) <= 0xCFFF
    # 4. an MR image with no pixel data
    nopix = mr_dataset(study, series)
    del nopix.PixelData
    (status,) = store(node.port, nopix)
    assert status == 0xA900
    # nothing partial kept, nothing indexed, nothing written outside data_dir
    assert node.spool_files() == []
    assert list((node.data_dir / "spool" / "tmp").iterdir()) == []
    assert not (node.data_dir.parent / "x").exists() and not (node.data_dir / "x").exists()
    assert node.status()["studies"] == []
    refused = [e for e in json.loads(node.cli("events", "--json").stdout) if e["kind"] == "store_refused"]
    assert len(refused) == 4
    # the next association is served normally
    assert store(node.port, good) == [0]
    assert len(node.spool_files()) == 1
    assert node.proc is not None and node.proc.poll() is None


def _file_meta_bytes(path: Path) -> bytes:
    """The group-2 bytes of a file written by pydicom (after preamble and DICM)."""
    data = path.read_bytes()
    group_len = int.from_bytes(data[140:144], "little")
    return data[132 : 144 + group_len]


def test_disk_watermark_refuses_with_a700_and_writes_nothing(tmp_path: Path) -> None:
    n = NodeProcess(tmp_path / "data", min_free_disk_mb=1 << 40).start()  # more than any disk has
    try:
        ds = mr_dataset(generate_uid(), generate_uid())
        assert store(n.port, ds) == [0xA700]
        assert n.spool_files() == []
        assert n.status()["studies"] == []
        assert "free disk under min_free_disk_mb" in n.log()
    finally:
        n.stop()


def test_no_phi_in_info_logs(node: NodeProcess) -> None:
    ds = mr_dataset(generate_uid(), generate_uid())
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN-778899"
    ds.PatientBirthDate = "19700101"
    store(node.port, ds, ds)
    log = node.log()
    for phi in ("DOE", "MRN-778899", "19700101", ds.StudyInstanceUID):
        assert phi not in log


def test_explicit_vr_preferred_when_both_proposed(node: NodeProcess) -> None:
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(MR_IMAGE_STORAGE, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    (cx,) = assoc.accepted_contexts
    assert cx.transfer_syntax[0] == ExplicitVRLittleEndian
    assoc.release()


def test_spool_recovery_moves_unindexed_files_and_drops_partials(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    partial = spool.tmp / "half.dcm"
    partial.write_bytes(b"partial")
    kept_tmp = spool.tmp / "whole.dcm"
    kept_tmp.write_bytes(b"indexed")
    kept, _ = spool.commit(kept_tmp)
    orphan_tmp = spool.tmp / "orphan.dcm"
    orphan_tmp.write_bytes(b"renamed, never indexed")
    orphan, _ = spool.commit(orphan_tmp)
    assert spool.recover({kept}) == (1, 1)
    assert (tmp_path / kept).exists() and not (tmp_path / orphan).exists()
    assert [p.read_bytes() for p in spool.orphans.iterdir()] == [b"renamed, never indexed"]
    assert list(spool.tmp.iterdir()) == []
    with pytest.raises(ValueError):
        spool.path("../../etc/passwd")


def test_truncated_encapsulated_dataset_is_refused(node: NodeProcess, tmp_path: Path, real_data_dir: Path) -> None:
    """A JPEG 2000 file cut short: pydicom only warns, the node must refuse it."""
    jp2 = real_data_dir / "siemens_trio_EPI_9_transfer_syntaxes_HUMAN" / "dcm" / "9.dcm"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(jp2.read_bytes()[:-5000])
    ds = dcmread(jp2, stop_before_pixels=True)
    ae = AE(ae_title="GOODSCU")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    assert int(assoc.send_c_store(cut).Status) == 0xC214
    assert int(assoc.send_c_store(jp2).Status) == 0
    assoc.release()
    assert len(node.spool_files()) == 1


def test_parallel_associations_all_stored_and_a_foreign_report_class_is_stored(node: NodeProcess) -> None:
    """Four associations at once (index writes take turns, directory fsyncs are shared): every instance indexed.

    A Secondary Capture is a class the node itself sends; one that is not the
    node's own is stored like anything else.
    """
    study = generate_uid()
    series = [generate_uid() for _ in range(4)]
    results: list[list[int]] = []

    def send(k: int) -> None:
        results.append(store(node.port, *(mr_dataset(study, series[k], instance=i) for i in range(10))))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [[0] * 10] * 4
    sc = mr_dataset(study, generate_uid())
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    sc.Modality = "OT"
    assoc = associate(node.port, contexts=(SECONDARY_CAPTURE_IMAGE_STORAGE,))
    assert assoc.is_established
    assert int(assoc.send_c_store(sc).Status) == 0
    assoc.release()
    (st,) = node.status()["studies"]
    assert st["instances"] == 41 and st["duplicates"] == 0
    assert len(node.spool_files()) == 41
