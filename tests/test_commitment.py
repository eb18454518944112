"""Confirmed delivery against a real Orthanc: storage commitment, the C-FIND fallback, and a PACS that lost the SR.

The node here is its real listener (``StorageSCP``, which must accept the
N-EVENT-REPORT Orthanc sends on a NEW association) and its real outbox on a
real index, in this process as tests/test_dispatch.py does; Orthanc knows the
node as modality ``node`` (AE ``TESTNODE`` at the listener's port). States are
waited for by polling the index with generous bounds, never by fixed sleeps.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from conftest import need
from dicomnode.config import Settings, SettingsError
from dicomnode.dicom.scp import StorageSCP
from dicomnode.index.studies import Index
from dicomnode.runtime.dispatcher import Dispatcher
from dicomnode.spool import Spool
from dicomnode.stages.dispatch import PENDING, SENT, Outbox, describe
from nodeutil import NODE_AET, free_port
from pacs import Orthanc

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
PATIENT = "SECRET^COMMITMENT"


def write_sr(data_dir: Path) -> Path:
    """A small Enhanced SR under ``data_dir/reports``, standing in for the node's report."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_SR
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = PATIENT
    ds.PatientID = "COMMIT001"
    ds.SeriesNumber = 901
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    out = data_dir / "reports" / f"{uuid.uuid4().hex}.dcm"
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def wait_until(predicate: Callable[[], bool], timeout: float = 120.0, every: float = 0.1) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(every)


def need_orthanc() -> None:
    need(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")


def orthanc_ids(pacs: Orthanc, sop_instance_uid: str) -> list[str]:
    body = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}).encode()
    return list(pacs.request("POST", "/tools/find", body))


@dataclass
class Rig:
    """A node (listener + outbox on one index) and an Orthanc that knows it."""

    pacs: Orthanc
    outbox: Outbox
    scp: StorageSCP
    settings: Settings

    def row(self) -> dict[str, Any]:
        (r,) = self.outbox.status()
        return r

    def pump_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        """Pump (as the Dispatcher would) until the one delivery row satisfies ``predicate``."""
        def done() -> bool:
            self.outbox.pump()
            return predicate(self.row())
        wait_until(done, timeout, every=0.2)
        return self.row()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    need_orthanc()
    made: list[tuple[Orthanc, StorageSCP, Index]] = []

    def make(**destination: Any) -> Rig:
        port = free_port()
        pacs = Orthanc(tmp_path / "orthanc", port)
        settings = Settings().replace(
            ae_title=NODE_AET, host="127.0.0.1", port=port, data_dir=str(tmp_path / "data"),
            destinations=[{**pacs.destination, **destination}], min_free_disk_mb=10,
            dispatch_retry_initial_s=0.5, dispatch_retry_max_s=2.0, dispatch_max_attempts=10,
            acse_timeout_s=10.0, dimse_timeout_s=10.0,
        )
        settings.data_path.mkdir(parents=True, exist_ok=True)
        index = Index(settings.index_url)
        scp = StorageSCP(settings, index, Spool(settings.data_path, fsync=False))
        scp.start()
        made.append((pacs, scp, index))
        return Rig(pacs, Outbox(index, settings), scp, settings)

    yield make
    for pacs, scp, index in made:
        scp.stop()
        pacs.stop()
        index.close()


# -- (a) storage commitment: Orthanc reports on a new association to the listener ----------------


def test_storage_commitment_confirms_the_delivery(rig: Callable[..., Rig], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.dicom.commit")
    r = rig(confirm="commitment", confirm_after_s=0)
    sr = write_sr(r.settings.data_path)
    uid = str(dcmread(sr).SOPInstanceUID)
    assert r.outbox.enqueue([sr], study_id=1, version_id=1) == 1
    first = r.outbox.pump()
    assert len(first.sent) == 1
    row = r.row()
    assert (row["state"], row["confirmation"]) == (SENT, "awaiting")  # taken, not yet vouched for
    assert describe(row) == "sent, awaiting confirmation"

    row = r.pump_until(lambda d: d["confirmation"] == "confirmed")
    assert row["state"] == SENT and row["attempts"] == 1  # confirmed without sending again
    assert row["transaction_uid"] and row["confirmed_at"] and row["confirm_attempts"] >= 1
    assert describe(row) == "sent, confirmed"
    assert orthanc_ids(r.pacs, uid)
    # the readers of ``state`` see what they always saw; the confirmation has its own count
    assert r.outbox.summary() == {"pending": 0, "sent": 1, "parked": 0, "total": 1}
    assert r.outbox.confirmations() == {"awaiting": 0, "confirmed": 1, "unconfirmed": 0, "failed": 0}
    # Orthanc's report came on an association of its own, to the listener (Orthanc never uses the N-ACTION's)
    assert any("from ORTHANC on a new association" in m for m in caplog.messages), caplog.messages
    events = r.outbox.index.recent_events()
    assert "delivery_confirmed" in [e["kind"] for e in events]
    assert PATIENT not in json.dumps(r.outbox.status()) + json.dumps(events)


# -- (b) the C-FIND fallback ------------------------------------------------------------------------


def test_find_confirms_the_delivery(rig: Callable[..., Rig]) -> None:
    r = rig(confirm="find", confirm_after_s=0)
    sr = write_sr(r.settings.data_path)
    r.outbox.enqueue([sr], study_id=2, version_id=1)
    assert len(r.outbox.pump().sent) == 1
    row = r.pump_until(lambda d: d["confirmation"] == "confirmed")
    assert row["state"] == SENT and row["attempts"] == 1 and row["transaction_uid"] is None
    assert row["confirm_attempts"] == 1  # the first C-FIND answered; no retry was needed


# -- (c) the PACS lost the SR between the C-STORE and the confirmation: sent again, then confirmed ------


@pytest.mark.parametrize("mode", ["commitment", "find"])
def test_sr_deleted_in_orthanc_is_sent_again_and_confirmed(rig: Callable[..., Rig], mode: str) -> None:
    r = rig(confirm=mode, confirm_after_s=0)
    sr = write_sr(r.settings.data_path)
    uid = str(dcmread(sr).SOPInstanceUID)
    r.outbox.enqueue([sr], study_id=3, version_id=1)
    assert len(r.outbox.pump().sent) == 1  # a pump sends; confirmation comes with the next one
    (orthanc_id,) = orthanc_ids(r.pacs, uid)
    r.pacs.request("DELETE", f"/instances/{orthanc_id}")
    assert orthanc_ids(r.pacs, uid) == []

    # the next pump asks; the PACS says it does not have it: pending again (the outbox's backoff)
    row = r.pump_until(lambda d: d["state"] == PENDING or d["attempts"] == 2)  # a busy host may do both at once
    if row["state"] == PENDING:
        assert row["confirmation"] is None and row["confirm_error"] == row["last_error"]
        assert ("no such object instance" if mode == "commitment" else "C-FIND found no") in row["last_error"]
    # then sent again, and confirmed this time
    row = r.pump_until(lambda d: d["confirmation"] == "confirmed")
    assert row["state"] == SENT and row["attempts"] == 2, row  # exactly one more C-STORE
    assert len(orthanc_ids(r.pacs, uid)) == 1
    assert str(dcmread(sr).SOPInstanceUID) == uid  # the same object, the same UID
    kinds = [e["kind"] for e in r.outbox.index.recent_events()]
    assert "delivery_resend" in kinds and kinds.count("delivery_sent") == 2 and "delivery_confirmed" in kinds


# -- the node as a whole: the Dispatcher thread does it all ------------------------------------------


def test_dispatcher_confirms_by_commitment(rig: Callable[..., Rig]) -> None:
    r = rig(confirm="commitment", confirm_after_s=0.2)
    dispatcher = Dispatcher(r.outbox, poll_s=0.2).start()
    try:
        r.outbox.enqueue([write_sr(r.settings.data_path)], study_id=4, version_id=1)
        dispatcher.nudge()
        wait_until(lambda: r.row()["confirmation"] == "confirmed", timeout=120)
        assert dispatcher.alive and dispatcher.failures == 0
    finally:
        dispatcher.stop()


# -- none, and a peer that cannot confirm -----------------------------------------------------------


def test_confirm_none_is_shown_as_unconfirmed_and_never_asks(rig: Callable[..., Rig]) -> None:
    r = rig(confirm="none")
    r.outbox.enqueue([write_sr(r.settings.data_path)], study_id=5, version_id=1)
    assert len(r.outbox.pump().sent) == 1
    result = r.outbox.pump(now=time.time() + 3600)
    assert not (result.confirmed or result.confirm_waiting or result.resend or result.unconfirmable)
    row = r.row()
    assert (row["state"], row["confirmation"]) == (SENT, "unconfirmed")
    assert describe(row) == "sent (unconfirmed)"


def test_a_peer_without_c_find_leaves_the_delivery_sent_but_unconfirmed(tmp_path: Path) -> None:
    """A storage-only SCP accepts the association but not the FIND context: no point asking again, no re-send."""
    port = free_port()
    ae = AE(ae_title="STOREONLY")
    ae.add_supported_context(Verification)
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    ae.add_supported_context(ENHANCED_SR, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _e: 0x0000)])
    settings = Settings().replace(
        ae_title="NODE", data_dir=str(tmp_path / "data"),
        destinations=[{"ae_title": "STOREONLY", "host": "127.0.0.1", "port": port, "confirm_after_s": 0}],
        acse_timeout_s=5.0, dimse_timeout_s=5.0,
    )
    assert settings.destinations[0].confirm == "find"  # the default
    settings.data_path.mkdir(parents=True)
    index = Index(settings.index_url)
    try:
        outbox = Outbox(index, settings)
        outbox.enqueue([write_sr(settings.data_path)], study_id=6, version_id=1)
        assert len(outbox.pump().sent) == 1
        assert len(outbox.pump().unconfirmable) == 1
        (row,) = outbox.status()
        assert (row["state"], row["confirmation"], row["attempts"]) == (SENT, "failed", 1)
        assert "none of the proposed" in row["confirm_error"]
        assert describe(row).startswith("sent, not confirmed:")
    finally:
        server.shutdown()
        index.close()


def test_confirm_setting_is_checked_at_start_up(tmp_path: Path) -> None:
    base = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}
    assert Settings().replace(destinations=["PACS@127.0.0.1:104"]).destinations[0].confirm == "find"
    s = Settings().replace(destinations=[{**base, "confirm": "Commitment", "confirm_timeout_s": 30}])
    assert (s.destinations[0].confirm, s.destinations[0].confirm_timeout_s) == ("commitment", 30.0)
    with pytest.raises(SettingsError, match="confirm"):
        Settings().replace(destinations=[{**base, "confirm": "maybe"}])
    with pytest.raises(SettingsError, match="confirm"):
        Settings().replace(destinations=[{**base, "confirm_timeout_s": 0}])
