"""Dispatch against real peers: Orthanc, dcmtk storescp, pynetdicom SCPs answering chosen statuses, PostgreSQL.

Retry intervals are small and pumps are given an explicit ``now`` where the
test is about time, so backoff is checked without sleeping through it.
"""
from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, SecondaryCaptureImageStorage, Verification

from conftest import dcmtk_tool, need
from dicomnode.config import Settings
from dicomnode.dicom.scu import echo_destinations
from dicomnode.dicom.status import Verdict, backoff_s, classify_status
from dicomnode.runtime.dispatcher import Dispatcher
from dicomnode.stages.dispatch import PARKED, PENDING, SENT, Delivery, Outbox
from dicomnode.index.studies import Index
from nodeutil import PROCESS_TIMEOUT_S, free_port
from nodeutil import wait_until as _wait_until
from pacs import Orthanc

PATIENT = "SECRET^PATIENTNAME"


# -- helpers -------------------------------------------------------------------------------


def write_sc(data_dir: Path, study_uid: str | None = None, name: str | None = None) -> Path:
    """A small Secondary Capture under ``data_dir/reports``, standing in for a generated report object."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = PATIENT
    ds.PatientID = "DISP001"
    ds.SeriesNumber = 900
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(64))
    out = data_dir / "reports" / (name or f"{uuid.uuid4().hex}.dcm")
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def settings_for(data_dir: Path, *destinations: Any, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "ae_title": "DISPATCHTEST",
        "data_dir": str(data_dir),
        "destinations": list(destinations),
        "dispatch_retry_initial_s": 0.5,
        "dispatch_retry_max_s": 2.0,
        "dispatch_max_attempts": 5,
        # bounds for a peer in this process on a loaded machine; a refusal or a closed port answers at once
        "acse_timeout_s": 60.0,
        "dimse_timeout_s": 60.0,
        "network_timeout_s": 120.0,
    }
    base.update(changes)
    return Settings().replace(**base)


def dest(port: int, aet: str = "PEER", **extra: Any) -> dict[str, Any]:
    return {"ae_title": aet, "host": "127.0.0.1", "port": port, **extra}


@pytest.fixture
def make_outbox(tmp_path: Path) -> Iterator[Callable[..., Outbox]]:
    """Outboxes on real index databases; every index is closed after the test."""
    indexes: list[Index] = []

    def make(settings: Settings, **kw: Any) -> Outbox:
        settings.data_path.mkdir(parents=True, exist_ok=True)
        ix = Index(settings.index_url)
        indexes.append(ix)
        return Outbox(ix, settings, **kw)

    yield make
    for ix in indexes:
        ix.close()


def row(outbox: Outbox, delivery_id: int | None = None) -> dict[str, Any]:
    rows = outbox.status()
    return rows[0] if delivery_id is None else next(r for r in rows if r["id"] == delivery_id)


def raw_row(outbox: Outbox, delivery_id: int) -> Any:
    with outbox.engine.connect() as c:
        return c.execute(Delivery.__table__.select().where(Delivery.id == delivery_id)).mappings().one()


class StoreSCP:
    """A pynetdicom storage SCP answering C-STORE with a chosen status; records what it received."""

    def __init__(self, status: int = 0x0000, *, sop_classes: tuple[str, ...] = (SecondaryCaptureImageStorage,),
                 delay_s: float = 0.0, ae_title: str = "PEER", port: int | None = None,
                 require_called_aet: bool = False, max_associations: int = 10,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.status = status
        self.delay_s = delay_s
        self._stopping = threading.Event()  # ends a delay early at stop(), so a long one costs no test time
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.port = port or free_port()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.maximum_associations = max_associations
        ae.add_supported_context(Verification)
        for sop in sop_classes:
            ae.add_supported_context(sop, [ExplicitVRLittleEndian])
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: Any) -> int:
        if self.delay_s:
            self._stopping.wait(self.delay_s)
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()


@pytest.fixture
def scps() -> Iterator[Callable[..., StoreSCP]]:
    started: list[StoreSCP] = []

    def make(*args: Any, **kw: Any) -> StoreSCP:
        scp = StoreSCP(*args, **kw)
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = PROCESS_TIMEOUT_S, every: float = 0.1) -> Any:
    """Poll for a state; ``timeout`` is an upper bound (minutes), never a margin the test relies on."""
    return _wait_until(predicate, timeout=timeout, every=every)


def orthanc_has(pacs: Orthanc, sop_instance_uid: str) -> bool:
    body = json.dumps({"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}).encode()
    return len(pacs.request("POST", "/tools/find", body)) == 1


def need_orthanc() -> None:
    need(shutil.which("Orthanc") is not None, "Orthanc (Debian package orthanc)")


# -- classification (the table in docs/dispatch.md) ---------------------------------------


def test_status_classification_and_backoff_table() -> None:
    sent = [0x0000, 0xB000, 0xB006, 0xB007]
    retry = [None, 0xA700, 0xA7FF]
    park = [0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0110, 0x0122, 0x0211]
    assert {classify_status(s).verdict for s in sent} == {Verdict.SENT}
    assert {classify_status(s).verdict for s in retry} == {Verdict.RETRY}
    assert {classify_status(s).verdict for s in park} == {Verdict.PARK}
    assert [backoff_s(a, 10, 600) for a in (1, 2, 3, 7, 8, 500)] == [10, 20, 40, 600, 600, 600]


# -- (a) Orthanc receives; enqueue is idempotent -------------------------------------------


def test_orthanc_receives_reports_and_enqueue_again_is_a_no_op(tmp_path: Path, make_outbox) -> None:
    need_orthanc()
    pacs = Orthanc(tmp_path / "orthanc", free_port())
    try:
        s = settings_for(tmp_path / "data", pacs.destination)
        outbox = make_outbox(s)
        study = generate_uid()
        files = [write_sc(s.data_path, study), write_sc(s.data_path, study)]
        assert outbox.enqueue(files, study_id=7, version_id=3) == 2
        result = outbox.pump()
        assert len(result.sent) == 2 and not result.retrying and not result.parked
        for f in files:
            assert orthanc_has(pacs, str(dcmread(f).SOPInstanceUID))
        assert {r["state"] for r in outbox.status()} == {SENT}
        assert all(r["last_status"] == 0 and r["attempts"] == 1 and r["sent_at"] for r in outbox.status())
        # the same report again (a re-run pipeline): no new row, nothing sent twice
        assert outbox.enqueue(files, study_id=7, version_id=3) == 0
        assert outbox.pump().attempted == 0
        assert outbox.summary() == {"pending": 0, "sent": 2, "parked": 0, "total": 2}
        assert len(pacs.get("/instances")) == 2
        # status and the event log carry no patient data
        events = outbox.index.recent_events()
        assert [e["kind"] for e in events].count("delivery_sent") == 2
        assert PATIENT not in json.dumps(outbox.status()) + json.dumps(events)
    finally:
        pacs.stop()


# -- (b) destination down, then dcmtk storescp comes up on that port ----------------------


def test_down_destination_is_retried_and_storescp_gets_the_same_sop_instance(tmp_path: Path, make_outbox) -> None:
    storescp = dcmtk_tool("storescp")
    port = free_port()
    s = settings_for(tmp_path / "data", dest(port, "STORESCP"), dispatch_retry_initial_s=3.0,
                     dispatch_retry_max_s=10.0)
    outbox = make_outbox(s)
    f = write_sc(s.data_path)
    uid = str(dcmread(f).SOPInstanceUID)
    outbox.enqueue([f], study_id=1, version_id=1)
    t0 = time.time()
    started = time.monotonic()
    result = outbox.pump(now=t0)
    took = time.monotonic() - started  # the backoff counts from the end of the attempt, however long it took
    assert result.retrying and not result.sent
    r = raw_row(outbox, result.retrying[0])
    assert (r["state"], r["attempts"]) == (PENDING, 1)
    assert t0 + 3.0 <= r["next_attempt_at"] <= t0 + took + 3.0 + 0.001
    assert "could not connect" in r["last_error"]
    # not due yet: nothing is attempted
    assert outbox.pump(now=t0 + 1.0).attempted == 0

    received = tmp_path / "storescp"
    received.mkdir()
    proc = subprocess.Popen([storescp, "-od", str(received), str(port)], env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: echo_destinations(s)[0][1], every=0.1)
        result = outbox.pump(now=r["next_attempt_at"] + 0.01)
        assert result.sent == [r["id"]]
        (got,) = list(received.iterdir())
        assert str(dcmread(got).SOPInstanceUID) == uid
        assert got.read_bytes()[-64:] == f.read_bytes()[-64:]  # the pixels went as stored
        assert row(outbox)["state"] == SENT and row(outbox)["attempts"] == 2
    finally:
        proc.terminate()
        proc.wait(120)


# -- (c) backoff doubles and caps; parked after max attempts; retry un-parks --------------


def test_backoff_doubles_caps_parks_and_operator_retry_unparks(tmp_path: Path, make_outbox, scps) -> None:
    port = free_port()
    s = settings_for(tmp_path / "data", dest(port), dispatch_retry_initial_s=1.0, dispatch_retry_max_s=3.0,
                     dispatch_max_attempts=5)
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=2, version_id=None)
    (delivery_id,) = [r["id"] for r in outbox.status()]
    now = time.time()
    for attempt, want in zip(range(1, 5), [1.0, 2.0, 3.0, 3.0]):
        started = time.monotonic()
        result = outbox.pump(now=now)
        took = time.monotonic() - started  # the backoff counts from the end of the attempt, however long it took
        assert result.retrying == [delivery_id]
        r = raw_row(outbox, delivery_id)
        assert r["attempts"] == attempt and r["state"] == PENDING
        assert want <= r["next_attempt_at"] - now <= want + took + 0.001, (attempt, r["next_attempt_at"] - now, took)
        now = r["next_attempt_at"]
    result = outbox.pump(now=now)
    assert result.parked == [delivery_id]
    r = raw_row(outbox, delivery_id)
    assert (r["state"], r["attempts"]) == (PARKED, 5)
    assert r["last_error"].startswith("gave up after 5 attempts")
    assert outbox.pump(now=now + 100).attempted == 0  # parked rows wait for an operator

    scp = scps(port=port)
    assert outbox.retry([delivery_id + 1000]) == 0
    assert outbox.retry() == 1
    assert row(outbox)["state"] == PENDING and row(outbox)["attempts"] == 0
    assert outbox.pump().sent == [delivery_id]
    assert len(scp.received) == 1
    kinds = [e["kind"] for e in outbox.index.recent_events()]
    assert kinds.count("delivery_retry") == 4 and "delivery_parked" in kinds and "delivery_requeued" in kinds


# -- (d) what the peer answers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "state", "error"),
    [
        (0xA900, PARKED, "does not match SOP class"),
        (0xC000, PARKED, "cannot understand"),
        (0x0110, PARKED, "refused with status 0x0110"),
        (0xA700, PENDING, "out of resources"),
        (0xB007, SENT, "warning 0xB007"),
    ],
)
def test_peer_status_decides_sent_retry_or_park(
    tmp_path: Path, make_outbox, scps, status: int, state: str, error: str
) -> None:
    scp = scps(status)
    s = settings_for(tmp_path / "data", dest(scp.port))
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=3, version_id=1)
    outbox.pump()
    r = row(outbox)
    assert (r["state"], r["attempts"], r["last_status"]) == (state, 1, status)
    assert error in r["last_error"]
    assert len(scp.received) == 1


def test_peer_that_does_not_accept_the_sop_class_parks_it(tmp_path: Path, make_outbox, scps) -> None:
    scp = scps(sop_classes=(MRImageStorage,))
    s = settings_for(tmp_path / "data", dest(scp.port))
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=4, version_id=1)
    assert len(outbox.pump().parked) == 1
    r = row(outbox)
    assert r["state"] == PARKED and "none of the proposed SOP class" in r["last_error"]
    assert scp.received == []


def test_one_pump_sends_what_the_peer_takes_and_parks_the_rest(tmp_path: Path, make_outbox, scps) -> None:
    """One association for both objects (the SCU's one loop): the accepted context is sent, the other parked."""
    scp = scps()  # takes Secondary Capture only
    s = settings_for(tmp_path / "data", dest(scp.port))
    outbox = make_outbox(s)
    sc, mr = write_sc(s.data_path), write_sc(s.data_path)
    ds = dcmread(mr)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(mr, enforce_file_format=True)
    outbox.enqueue([sc, mr], study_id=13, version_id=1)
    result = outbox.pump()
    assert len(result.sent) == 1 and len(result.parked) == 1
    by_class = {r["sop_class_uid"]: r for r in outbox.status()}
    assert by_class[SecondaryCaptureImageStorage]["state"] == SENT
    parked = by_class[MRImageStorage]
    assert parked["state"] == PARKED and "did not accept SOP class" in parked["last_error"]
    assert scp.received == [str(dcmread(sc).SOPInstanceUID)]


def test_association_rejections_permanent_parks_transient_retries(tmp_path: Path, make_outbox, scps) -> None:
    strict = scps(ae_title="RIGHTAET", require_called_aet=True)
    busy = scps(max_associations=1)
    s = settings_for(tmp_path / "data", dest(strict.port, "WRONGAET"), dest(busy.port))
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=5, version_id=1)
    hog = AE(ae_title="HOG")
    hog.add_requested_context(Verification)
    held = hog.associate("127.0.0.1", busy.port, ae_title="PEER")
    assert held.is_established
    try:
        outbox.pump()
    finally:
        held.release()
    by_dest = {r["destination"]: r for r in outbox.status()}
    rejected = by_dest[f"WRONGAET@127.0.0.1:{strict.port}"]
    assert rejected["state"] == PARKED and "Rejected Permanent" in rejected["last_error"]
    congested = by_dest[f"PEER@127.0.0.1:{busy.port}"]
    assert congested["state"] == PENDING and "Rejected Transient" in congested["last_error"]


def test_dimse_timeout_is_retried(tmp_path: Path, make_outbox, scps) -> None:
    # the peer answers only after 60 s (released at the test's end), far beyond the 0.5 s DIMSE timeout
    scp = scps(delay_s=60.0)
    s = settings_for(tmp_path / "data", dest(scp.port), dimse_timeout_s=0.5)
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=6, version_id=1)
    assert len(outbox.pump().retrying) == 1
    r = row(outbox)
    assert r["state"] == PENDING and r["last_status"] is None and "no C-STORE response" in r["last_error"]


def test_a_destination_whose_host_does_not_resolve_is_retried_with_the_reason(tmp_path: Path, make_outbox) -> None:
    # pynetdicom lets the resolver's error out of associate(): the pump must record it, not die on it
    s = settings_for(tmp_path / "data", {"ae_title": "PACS", "host": "no-such-host.invalid", "port": 104})
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=7, version_id=1)
    assert len(outbox.pump().retrying) == 1
    r = row(outbox)
    assert r["state"] == PENDING and "'no-such-host.invalid'" in r["last_error"]
    assert "cannot be resolved" in r["last_error"]


# -- (e) the outbox survives a restart -----------------------------------------------------


def test_pending_rows_survive_a_restart(tmp_path: Path, make_outbox, scps) -> None:
    port = free_port()
    s = settings_for(tmp_path / "data", dest(port))
    first = make_outbox(s)
    files = [write_sc(s.data_path) for _ in range(3)]
    first.enqueue(files, study_id=8, version_id=1)
    assert len(first.pump().retrying) == 3
    first.index.close()

    scp = scps(port=port)
    second = make_outbox(s)  # a new process: new engine on the same SQLite file
    assert second.summary()["pending"] == 3
    assert len(second.pump(now=time.time() + 3600).sent) == 3  # past any backoff, however long the first pump took
    assert sorted(scp.received) == sorted(str(dcmread(f).SOPInstanceUID) for f in files)


# -- (f) Orthanc down while a report is due, up again later; the Dispatcher thread ---------


def test_dispatcher_delivers_after_orthanc_comes_back(tmp_path: Path, make_outbox) -> None:
    need_orthanc()
    pacs = Orthanc(tmp_path / "orthanc", free_port())
    pacs.stop()
    s = settings_for(tmp_path / "data", pacs.destination, dispatch_retry_initial_s=0.3, dispatch_retry_max_s=0.6,
                     dispatch_max_attempts=1000)
    outbox = make_outbox(s)
    dispatcher = Dispatcher(outbox, poll_s=0.1).start()
    try:
        f = write_sc(s.data_path)
        outbox.enqueue([f], study_id=9, version_id=1)
        dispatcher.nudge()
        wait_until(lambda: row(outbox)["attempts"] >= 2)
        assert row(outbox)["state"] == PENDING
        pacs.start()
        wait_until(lambda: row(outbox)["state"] == SENT)
        assert orthanc_has(pacs, str(dcmread(f).SOPInstanceUID))
        assert dispatcher.alive and dispatcher.failures == 0
    finally:
        dispatcher.stop()
        pacs.stop()


def test_a_failing_pump_does_not_end_the_dispatcher(tmp_path: Path, make_outbox, scps) -> None:
    scp = scps()
    s = settings_for(tmp_path / "data", dest(scp.port))
    outbox = make_outbox(s)
    dispatcher = Dispatcher(outbox, poll_s=0.05)
    Delivery.__table__.drop(outbox.engine)  # the database loses the table under a running node
    dispatcher.start()
    try:
        wait_until(lambda: dispatcher.failures >= 2)
        assert dispatcher.alive and dispatcher.last_error
        Delivery.metadata.create_all(outbox.engine, tables=[Delivery.__table__])
        outbox.enqueue([write_sc(s.data_path)], study_id=10, version_id=1)
        dispatcher.nudge()
        wait_until(lambda: row(outbox)["state"] == SENT)
        assert dispatcher.last_error is None and len(scp.received) == 1
    finally:
        dispatcher.stop()
    assert not dispatcher.alive


# -- (g) two pumps on one database send each row exactly once -----------------------------


@pytest.mark.parametrize("db", ["postgresql", "sqlite"])
def test_two_pumps_on_one_database_send_each_row_exactly_once(
    tmp_path: Path, make_outbox, scps, request: pytest.FixtureRequest, db: str
) -> None:
    scp = scps(delay_s=0.005)
    url = request.getfixturevalue("pg_url") if db == "postgresql" else None
    s = settings_for(tmp_path / "data", dest(scp.port), database_url=url)
    a, b = make_outbox(s, batch_size=3), make_outbox(s, batch_size=3)
    files = [write_sc(s.data_path) for _ in range(30)]
    assert a.enqueue(files, study_id=11, version_id=1) == 30
    assert b.enqueue(files, study_id=11, version_id=1) == 0  # the other host re-running the same step
    barrier = threading.Barrier(2)
    sent: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def run(name: str, outbox: Outbox) -> None:
        try:
            barrier.wait()
            deadline = time.monotonic() + 300  # an upper bound; the loop ends when nothing is pending
            while outbox.summary()["pending"] and time.monotonic() < deadline:
                result = outbox.pump()
                assert not result.lost_claims and not result.retrying and not result.parked
                sent[name].extend(result.sent)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n, o)) for n, o in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(sent["a"] + sent["b"]) == sorted(r["id"] for r in a.status())
    assert not set(sent["a"]) & set(sent["b"])
    counts = Counter(scp.received)
    assert len(counts) == 30 and set(counts.values()) == {1}
    assert a.summary() == {"pending": 0, "sent": 30, "parked": 0, "total": 30}


# -- TLS and echo ------------------------------------------------------------------------


def test_tls_destination_with_client_certificate(tmp_path: Path, make_outbox, scps, pki: Path) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    scp = scps(ssl_context=server_ctx)
    good = {"ca_file": str(pki / "ca.pem"), "cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")}
    s = settings_for(tmp_path / "data", dest(scp.port, tls=good))
    assert [(n, ok) for n, ok, _ in echo_destinations(s)] == [(f"PEER@127.0.0.1:{scp.port}", True)]
    outbox = make_outbox(s)
    outbox.enqueue([write_sc(s.data_path)], study_id=12, version_id=1)
    assert len(outbox.pump().sent) == 1 and len(scp.received) == 1
    # without a client certificate the handshake fails: retried, not parked (a PACS restart looks the same)
    s2 = settings_for(tmp_path / "data2", dest(scp.port, tls={"ca_file": str(pki / "ca.pem")}))
    (name, ok, detail) = echo_destinations(s2)[0]
    assert not ok and "no association response" in detail


def test_echo_destinations_reports_each_peer(tmp_path: Path, scps) -> None:
    up = scps()
    down = free_port()
    s = settings_for(tmp_path / "data", dest(up.port), dest(down, "GONE"))
    (n1, ok1, d1), (n2, ok2, d2) = echo_destinations(s)
    assert (n1, ok1, d1) == (f"PEER@127.0.0.1:{up.port}", True, "C-ECHO status 0x0000")
    assert n2 == f"GONE@127.0.0.1:{down}" and not ok2 and "could not connect" in d2


def test_enqueue_refuses_files_outside_the_data_directory(tmp_path: Path, make_outbox) -> None:
    s = settings_for(tmp_path / "data", dest(free_port()))
    outbox = make_outbox(s)
    stray = write_sc(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="not under the data directory"):
        outbox.enqueue([stray], study_id=None, version_id=None)
    missing = write_sc(s.data_path)
    outbox.enqueue([missing], study_id=None, version_id=None)
    missing.unlink()
    outbox.pump()
    assert row(outbox)["state"] == PARKED and "missing" in row(outbox)["last_error"]
