"""Retention: delivered versions lose their spool and work files, the index keeps the record.

Two kinds of test. Index-level ones build study versions through the node's
own index API (real DICOM files committed by the real spool, real SQLite or
PostgreSQL, pipeline steps claimed and finished through ``Jobs``, outbox rows
in the states dispatch writes) and run :func:`purge` on them: every rule
there has a case that would fail if the rule were missing. Node-level ones
run a real ``dicomnode serve`` with a real storage SCP as its PACS: a study
purged, then a late series; and a late series stored while purges run.

Age is simulated by passing ``now`` (31 days ahead); the disk rule runs on a
64 MiB tmpfs mounted by the test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import func, insert, select, text, update

from conftest import need
from dicomnode.config import Settings
from dicomnode.index.jobs import STAGES, Jobs
from dicomnode.index.schema import Base, Delivery, EventRow, Instance, Job, Series, Study, StudyVersion
from dicomnode.index.studies import Index, InstanceMeta
from dicomnode.runtime import retention
from dicomnode.runtime.monitor import full_status
from dicomnode.runtime.retention import CLAIM_LEASE_S, MIB, PurgeReport, purge
from dicomnode.spool import Spool
from nodeutil import PROCESS_TIMEOUT_S, RELEASE_COMPLETES, REPO, NodeProcess, free_port, mr_dataset, store, wait_until

MR = "1.2.840.10008.5.1.4.1.1.4"
DAY = 86400.0
LATER = 31 * DAY  # "now" for the age rule: a month after everything here was delivered


# -- a world of study versions, built through the node's own index API ---------------------------


class World:
    """Study versions in chosen pipeline and delivery states, with real files where the node puts them."""

    def __init__(self, data_dir: Path, url: str | None = None, **settings: Any) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = Settings().replace(**{"data_dir": str(data_dir), "database_url": url, "retention_days": 30,
                                              "retention_min_free_disk_mb": 0, **settings})
        self.index = Index(self.settings.index_url)
        self.spool = Spool(self.settings.data_path, fsync=False)
        self.jobs = Jobs(self.index)
        self.t0 = time.time()

    def close(self) -> None:
        self.index.close()

    def receive(self, study: str, n: int = 3, *, rows: int = 16, series: str | None = None) -> tuple[int, int]:
        """``n`` MR instances of one series stored as the listener stores them; (study id, version)."""
        series = series or generate_uid()
        out = None
        for k in range(n):
            ds = mr_dataset(study, series, rows=rows, cols=rows, instance=k + 1)
            tmp = self.spool.tmp / f"{generate_uid()}.part"
            ds.save_as(tmp, enforce_file_format=True)
            rel, size = self.spool.commit(tmp)
            out = self.index.add_instance(
                InstanceMeta(ds.SOPInstanceUID, MR, ds.file_meta.TransferSyntaxUID, study, series, "MR", 1, "t2",
                             True), rel, size, "SCU", "127.0.0.1")
        assert out is not None
        return out.study_id, out.version

    def complete(self, study_id: int) -> int:
        """The study's receiving version, completed; its id."""
        due = next(d for d in self.index.due_versions(time.time() + 1000, 1.0, None) if d.study_id == study_id)
        series = {f.series_instance_uid for f in self.index.version_files(due.study_id, due.version)}
        assert self.index.complete_version(due, {s: {"role": "T2", "status": "selected", "reason": "test"}
                                                 for s in series}, time.time())
        return due.version_id

    def run(self, version_id: int, study_id: int, version: int, *, stop_at: str | None = None,
            fail: bool = False, at: float | None = None) -> None:
        """The pipeline's steps through ``Jobs``, with work files; ``stop_at``: left running (or failed) there."""
        work = self.settings.data_path / "work" / f"study-{study_id}" / f"v{version}"
        (work / "nifti").mkdir(parents=True, exist_ok=True)
        (work / "nifti" / "T2.nii").write_bytes(os.urandom(20000))
        (work / "result.json").write_text("{}")
        at = at or time.time()
        self.jobs.create(version_id, study_id, STAGES[0])
        for i, stage in enumerate(STAGES):
            assert self.jobs.claim(version_id, stage, holder="test:1", lease_s=60, max_deliveries=3).outcome == "run"
            if stage == stop_at:
                if fail:
                    self.jobs.fail(version_id, stage, holder="test:1", error="boom", seconds=0.1)
                return
            nxt = STAGES[i + 1] if i + 1 < len(STAGES) else None
            assert self.jobs.finish(version_id, stage, holder="test:1", seconds=0.1, detail={}, next_stage=nxt,
                                    now=at)
        report = self.settings.data_path / "reports" / f"study-{study_id}" / f"v{version}" / "sr.dcm"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_bytes(b"report")

    def owe(self, version_id: int, study_id: int, state: str, confirmation: str | None,
            at: float | None = None) -> None:
        """One delivery row of the version's report, in a state the outbox writes."""
        at = at or time.time()
        with self.index.engine.begin() as c:
            c.execute(insert(Delivery).values(
                study_id=study_id, version_id=version_id, destination="PACS@127.0.0.1:104",
                sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"reports/study-{study_id}/v1/sr.dcm", state=state,
                attempts=1, next_attempt_at=at, last_error="", created_at=at,
                sent_at=at if state == "sent" else None, confirmation=confirmation,
                confirmed_at=at if confirmation == "confirmed" else None))

    def delivered(self, at: float | None = None, n: int = 3, rows: int = 16,
                  study: str | None = None) -> tuple[int, int, int]:
        """A new version (of a new study unless ``study``), delivered and confirmed at ``at``."""
        sid, ver = self.receive(study or generate_uid(), n, rows=rows)
        vid = self.complete(sid)
        self.run(vid, sid, ver, at=at)
        self.owe(vid, sid, "sent", "confirmed", at=at)
        return vid, sid, ver

    def many_delivered(self, count: int, n: int = 4, at: float | None = None) -> list[int]:
        """``count`` delivered versions at once: the rows :meth:`delivered` makes, written in one transaction.

        For the tests that need many versions (the builder above commits per instance and per step, as the
        node does, which takes a minute for a hundred versions on a loaded machine); the files are real.
        """
        at = at or time.time()
        stored = []
        for _ in range(count):
            files = []
            for k in range(n):
                ds = mr_dataset(generate_uid(), generate_uid(), rows=16, cols=16, instance=k + 1)
                tmp = self.spool.tmp / f"{generate_uid()}.part"
                ds.save_as(tmp, enforce_file_format=True)
                files.append((ds, *self.spool.commit(tmp)))
            stored.append(files)
        vids = []
        with self.index.engine.begin() as c:
            for files in stored:
                ds0 = files[0][0]
                sid = c.execute(insert(Study).values(study_instance_uid=ds0.StudyInstanceUID, created_at=at)
                                .returning(Study.id)).scalar_one()
                se = c.execute(insert(Series).values(study_id=sid, series_instance_uid=ds0.SeriesInstanceUID,
                                                     modality="MR", created_at=at).returning(Series.id)).scalar_one()
                vid = c.execute(insert(StudyVersion).values(
                    study_id=sid, version=1, state="complete", opened_at=at, last_instance_at=at, completed_at=at,
                    complete_reason="quiet_period", new_instances=n).returning(StudyVersion.id)).scalar_one()
                for ds, rel, size in files:
                    c.execute(insert(Instance).values(
                        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=MR, transfer_syntax_uid="1.2.840.10008.1.2.1",
                        study_id=sid, series_id=se, version=1, gradable=True, path=rel, size_bytes=size,
                        received_at=at, duplicates=0))
                for stage in STAGES:
                    c.execute(insert(Job).values(version_id=vid, study_id=sid, stage=stage, state="done",
                                                 deliveries=1, created_at=at, finished_at=at, seconds=0.1, detail={}))
                work = self.settings.data_path / "work" / f"study-{sid}" / "v1" / "nifti"
                work.mkdir(parents=True)
                (work / "T2.nii").write_bytes(os.urandom(20000))
                (work.parent / "result.json").write_text("{}")
                vids.append(vid)
        for vid in vids:
            info = self.index.version_info(vid)
            assert info is not None
            self.owe(vid, info.study_id, "sent", "confirmed", at=at)
        return vids

    # -- what there is -------------------------------------------------------------------------

    def files_of_version(self, version_id: int) -> list[Path]:
        info = self.index.version_info(version_id)
        assert info is not None
        return self.files_of(info.study_id, info.version)

    def files_of(self, study_id: int, version: int) -> list[Path]:
        """The version's own files: its arrivals in the spool, and its work folder."""
        with self.index.engine.connect() as c:
            rels = c.execute(text("SELECT path FROM instances WHERE study_id = :s AND version = :v"),
                             {"s": study_id, "v": version}).scalars().all()
        work = self.settings.data_path / "work" / f"study-{study_id}" / f"v{version}"
        return [self.settings.data_path / r for r in rels] + [p for p in work.rglob("*") if p.is_file()]

    def all_files(self) -> dict[str, tuple[int, int]]:
        root = self.settings.data_path
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                if p.is_file() and not p.name.startswith("index.sqlite3")}

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        with self.index.engine.connect() as c:
            return {t.name: sorted(tuple(map(repr, r)) for r in c.execute(select(t)).all())
                    for t in Base.metadata.sorted_tables}

    def counts(self) -> dict[str, int]:
        with self.index.engine.connect() as c:
            return {t.name: c.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in Base.metadata.sorted_tables}

    def purged_at(self) -> dict[int, float | None]:
        with self.index.engine.connect() as c:
            return dict(c.execute(select(StudyVersion.id, StudyVersion.purged_at)).all())

    def purged_events(self) -> list[tuple[int, dict[str, Any]]]:
        with self.index.engine.connect() as c:
            return sorted((r.version_id, r.detail) for r in c.execute(
                select(EventRow.version_id, EventRow.detail).where(EventRow.kind == "purged")))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "data")
    yield w
    w.close()


def ids(report: PurgeReport) -> list[int]:
    return [v.version_id for v in report.versions]


# -- which versions go ---------------------------------------------------------------------------


def test_only_finished_delivered_versions_go_and_the_index_keeps_every_row(world: World) -> None:
    w = world
    gone: dict[str, int] = {}
    kept: dict[str, int] = {}
    gone["confirmed"] = w.delivered()[0]
    vid, sid, ver = w.delivered()  # a destination with confirm = "none"
    with w.index.engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.version_id == vid).values(confirmation="unconfirmed"))
    gone["unconfirmed"] = vid
    vid, sid, _ = w.delivered()  # the PACS took it but refuses to confirm (e.g. no C-FIND): delivered all the same
    with w.index.engine.begin() as c:
        c.execute(update(Delivery).where(Delivery.version_id == vid).values(confirmation="failed"))
    gone["confirmation failed"] = vid
    sid, ver = w.receive(generate_uid())  # no destination configured: the dispatch step done, nothing owed
    vid = w.complete(sid)
    w.run(vid, sid, ver)
    gone["no destination"] = vid
    # never: receiving, queued, running, failed, undelivered
    w.receive(generate_uid())
    with w.index.engine.connect() as c:
        kept["receiving"] = c.execute(select(func.max(StudyVersion.id))).scalar_one()
    sid, _ = w.receive(generate_uid())
    kept["queued"] = w.complete(sid)
    for name, stage, fail in (("running convert", "convert", False), ("running dispatch", "dispatch", False),
                              ("failed at infer", "infer", True)):
        sid, ver = w.receive(generate_uid())
        vid = w.complete(sid)
        w.run(vid, sid, ver, stop_at=stage, fail=fail)
        kept[name] = vid
    for name, state, conf in (("delivery pending", "pending", None), ("delivery parked", "parked", None),
                              ("awaiting confirmation", "sent", "awaiting")):
        sid, ver = w.receive(generate_uid())
        vid = w.complete(sid)
        w.run(vid, sid, ver)
        w.owe(vid, sid, "sent", "confirmed")  # one destination has it ...
        w.owe(vid, sid, state, conf)  # ... the other not (yet)
        kept[name] = vid
    # a study whose version 1 is delivered but whose version 2 (which reads version 1's instances) runs
    study = generate_uid()
    v1, sid, _ = w.delivered(study=study)
    sid, ver2 = w.receive(study, series=None)
    assert ver2 == 2
    v2 = w.complete(sid)
    w.run(v2, sid, ver2, stop_at="preprocess")
    kept["v1 under a running v2"], kept["running v2"] = v1, v2
    # ... and a study whose two versions are both delivered: both go
    study = generate_uid()
    gone["v1 of two"], sid, _ = w.delivered(study=study)
    w.receive(study)
    v2 = w.complete(sid)
    w.run(v2, sid, 2)
    w.owe(v2, sid, "sent", "confirmed")
    gone["v2 of two"] = v2

    files_before = w.all_files()
    counts_before = w.counts()
    gone_files = {vid: w.files_of_version(vid) for vid in gone.values()}
    assert all(len(f) >= 5 for f in gone_files.values())  # spool files and work files

    assert purge(w.settings, w.index, now=time.time()).versions == []  # delivered today: nothing is 30 days old
    report = purge(w.settings, w.index, now=time.time() + LATER)
    assert sorted(ids(report)) == sorted(gone.values()), {k: v in ids(report) for k, v in {**gone, **kept}.items()}
    assert {v.reason for v in report.versions} == {"age"}
    # files: the purged versions' spool and work files are gone, everything else is as it was
    for files in gone_files.values():
        assert not any(p.exists() for p in files)
    removed = {str(p.relative_to(w.settings.data_path)) for f in gone_files.values() for p in f}
    after = w.all_files()
    assert set(after) == set(files_before) - removed
    assert all(after[k] == files_before[k] for k in after)
    assert any(k.startswith("reports/") for k in after)  # report objects are kept
    assert report.files_removed == len(removed) and report.bytes_freed > 0
    # rows: every one kept; purged_at and one "purged" event per version with the bytes freed
    counts = w.counts()
    assert counts["events"] == counts_before["events"] + len(gone)
    assert {k: v for k, v in counts.items() if k != "events"} == \
        {k: v for k, v in counts_before.items() if k != "events"}
    purged_at = w.purged_at()
    assert {v for v, t in purged_at.items() if t is not None} == set(gone.values())
    events = dict(w.purged_events())
    assert set(events) == set(gone.values())
    assert all(events[v.version_id]["bytes"] == v.bytes > 0 and events[v.version_id]["files"] == v.files
               for v in report.versions)
    # the status document shows it (dicomnode status --json)
    versions = {v["version_id"]: v for st in w.index.status()["studies"] for v in st["versions"]}
    assert all(versions[v]["purged_at"] is not None and versions[v]["instances_purged"] > 0 for v in gone.values())
    assert all(versions[v]["purged_at"] is None for v in kept.values())
    assert versions[gone["v2 of two"]]["instances_purged"] == 6  # its own 3 and version 1's 3
    # a second pass finds nothing more
    again = purge(w.settings, w.index, now=time.time() + LATER)
    assert again.versions == [] and again.kept_undelivered == len(kept)
    assert again.lines()[-1].startswith("nothing to purge")


def test_nothing_goes_when_retention_is_off(world: World) -> None:
    world.delivered()
    off = world.settings.replace(retention_days=0, retention_min_free_disk_mb=0)
    files = world.all_files()
    assert purge(off, world.index, now=time.time() + 1000 * DAY).versions == []
    assert world.all_files() == files


def test_a_late_version_after_a_purge_sees_only_what_is_kept(world: World) -> None:
    """Version 2 opened after version 1 was purged: assembly and the stages get only version 2's files."""
    w = world
    study = generate_uid()
    v1, sid, _ = w.delivered(study=study, n=4)
    assert ids(purge(w.settings, w.index, now=time.time() + LATER)) == [v1]
    late_series = generate_uid()
    w.receive(study, n=2, series=late_series)
    files = w.index.version_files(sid, 2)
    assert [f.series_instance_uid for f in files] == [late_series] * 2
    assert all((w.settings.data_path / f.path).is_file() for f in files)
    assert w.index.purged_instances(sid, 2) == 4
    v2 = w.complete(sid)
    inputs = w.index.version_inputs(v2)
    assert [vi.series_instance_uid for vi in inputs] == [late_series] and len(inputs[0].instances) == 2
    with w.index.engine.connect() as c:
        msg = c.execute(select(EventRow.message).where(EventRow.kind == "version_complete",
                                                       EventRow.version_id == v2)).scalar_one()
    assert "4 earlier instance(s) purged by retention" in msg


def test_dry_run_changes_nothing_and_names_what_the_real_pass_purges(world: World) -> None:
    """The age rule here; the disk rule's dry run is checked on the small disk below."""
    w = world
    old = [w.delivered(at=time.time() - 40 * DAY)[0] for _ in range(4)]
    w.delivered()  # young
    sid, _ = w.receive(generate_uid())
    w.complete(sid)  # queued: never
    files, rows = w.all_files(), w.rows()
    now = time.time()
    dry = purge(w.settings, w.index, dry_run=True, now=now)
    assert w.all_files() == files and w.rows() == rows
    assert ids(dry) == old and [v.reason for v in dry.versions] == ["age"] * 4
    real = purge(w.settings, w.index, now=now)
    assert real.versions == dry.versions
    assert [line.replace("would purge", "purged") for line in dry.lines()[:-1]] == real.lines()[:-1]
    assert dry.lines()[-1].startswith("would free ") and real.lines()[-1].startswith("freed ")
    assert "delivered more than 30 days ago" in real.lines()[0] and "40.0 days ago" in real.lines()[0]
    doc = real.to_json()
    assert json.loads(json.dumps(doc))["bytes_freed"] == real.bytes_freed > 0
    assert [v["version_id"] for v in doc["versions"]] == ids(real)


def test_a_version_opened_between_reading_and_claiming_stops_the_claim(world: World) -> None:
    """The race the claim's own condition closes: a pass read the rows, then a late instance opened version 2."""
    w = world
    study = generate_uid()
    v1, sid, _ = w.delivered(study=study)
    files = w.files_of_version(v1)
    (cand,), _ = retention._candidates(w.index)  # what a pass read ...
    w.receive(study)  # ... before this arrival opened version 2, which reads version 1's instances
    report = PurgeReport(dry_run=False, now=time.time() + LATER, retention_days=30, min_free_disk_mb=0,
                         free_bytes_before=0)
    assert retention._purge_version(w.settings, w.index, w.spool, cand, "age", False, report, set()) is None
    assert all(p.exists() for p in files) and w.purged_at()[v1] is None and report.kept_undelivered == 1
    assert purge(w.settings, w.index, now=time.time() + LATER).versions == []


def test_an_interrupted_purge_is_finished_by_the_next_pass(world: World) -> None:
    """A process that died between its claim and its event: the claim's lease runs out, the next pass finishes."""
    w = world
    vid, sid, ver = w.delivered()
    files = w.files_of(sid, ver)
    with w.index.engine.begin() as c:  # the state such a death leaves: claimed, files still there, no event
        c.execute(update(StudyVersion).where(StudyVersion.id == vid)
                  .values(purged_at=time.time() - CLAIM_LEASE_S / 2))
    assert purge(w.settings, w.index).versions == []  # a claim within its lease belongs to a live purge
    assert all(p.exists() for p in files)
    with w.index.engine.begin() as c:
        c.execute(update(StudyVersion).where(StudyVersion.id == vid)
                  .values(purged_at=time.time() - CLAIM_LEASE_S - 60))
    report = purge(w.settings.replace(retention_days=0), w.index)  # finished even with the rules off
    assert [(v.version_id, v.reason) for v in report.versions] == [(vid, "interrupted")]
    assert not any(p.exists() for p in files)
    assert [v for v, _ in w.purged_events()] == [vid]
    assert purge(w.settings, w.index).versions == []


def test_the_loop_purges_every_interval_logs_one_line_and_stops(world: World,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    w = world
    settings = w.settings.replace(retention_days=1 / DAY, retention_interval_s=0.2)  # a second old is old
    first = w.delivered(at=time.time() - 60)[0]
    loop = retention.RetentionLoop(settings, w.index)
    with caplog.at_level("INFO", logger="dicomnode.runtime.retention"):
        loop.start()
        try:
            wait_until(lambda: w.purged_at()[first], what="the first pass purged the old version")
            second = w.delivered(at=time.time() - 60)[0]  # delivered while the loop runs: the next pass takes it
            wait_until(lambda: w.purged_at()[second], what="a later pass purged the next one")
        finally:
            loop.stop()
    assert loop.passes >= 2 and loop.failures == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "dicomnode.runtime.retention"]
    assert [ln for ln in lines if ln.startswith("retention: purged 1 version(s)")] and len(lines) == 2, lines
    assert "TEST^NETWORK" not in caplog.text and "NET001" not in caplog.text


# -- the free-disk rule, on a disk that is really small ------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs for this test only (root only, as in test_edge.py)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    ok = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    need(ok, "mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_free_disk_rule_purges_oldest_delivered_first_until_above_the_mark(small_disk: Path) -> None:
    w = World(small_disk / "data", retention_days=0)  # the age rule off: only the disk decides
    try:
        # 8 delivered versions of ~4 MiB each, delivered in an order unlike their creation order
        order = [5, 2, 7, 0, 3, 6, 1, 4]
        base = time.time() - 10 * DAY
        vids = []
        for k in order:
            vids.append(w.delivered(at=base + k * 3600, n=4, rows=724)[0])  # 724 x 724 x 2 bytes ~ 1 MiB each
        # the oldest of all, but its pipeline still runs: never purged, however full the disk
        sid, ver = w.receive(generate_uid(), n=4, rows=724)
        running = w.complete(sid)
        w.run(running, sid, ver, stop_at="infer", at=base - DAY)
        oldest_first = [vids[order.index(k)] for k in sorted(order)]

        free = shutil.disk_usage(small_disk).free
        assert free < 40 * MIB  # the versions really take the disk
        mark = free // MIB + 10  # 10 MiB more than is free: three versions of ~4 MiB
        settings = w.settings.replace(retention_min_free_disk_mb=int(mark))
        files, rows = w.all_files(), w.rows()
        dry = purge(settings, w.index, dry_run=True)
        assert w.all_files() == files and w.rows() == rows
        report = purge(settings, w.index)
        assert report.versions == dry.versions
        got = ids(report)
        assert got == oldest_first[:len(got)], (got, oldest_first)
        assert {v.reason for v in report.versions} == {"disk"}
        after = shutil.disk_usage(small_disk).free
        assert after >= mark * MIB  # above the mark again ...
        assert free + sum(v.bytes for v in report.versions[:-1]) < mark * MIB  # ... and not one version more
        assert 2 <= len(got) <= 4
        assert w.purged_at()[running] is None and all(p.exists() for p in w.files_of(sid, ver))
        assert purge(settings, w.index).versions == []  # above the mark: the next pass leaves the rest

        # a mark above what could ever be freed: every delivered version goes, the running one stays, and it says so
        high = settings.replace(retention_min_free_disk_mb=200)
        rest = purge(high, w.index)
        assert sorted(ids(rest)) == sorted(oldest_first[len(got):])
        assert rest.still_short and "still under retention_min_free_disk_mb=200" in rest.lines()[-1]
        assert w.purged_at()[running] is None and all(p.exists() for p in w.files_of(sid, ver))
    finally:
        w.close()


# -- two purges at once ----------------------------------------------------------------------------

PURGER = """
import json, sys, time
from pathlib import Path
from dicomnode.config import Settings
from dicomnode.index.studies import Index
from dicomnode.runtime.retention import purge
settings = Settings().replace(data_dir=sys.argv[1], database_url=sys.argv[2] or None, retention_days=30,
                              retention_min_free_disk_mb=0)
index = Index(settings.index_url)
go = Path(sys.argv[3])
Path(sys.argv[4]).write_text("ready")
while not go.exists():
    time.sleep(0.005)
report = purge(settings, index, now=time.time() + 31 * 86400)
print(json.dumps(report.to_json()))
index.close()
"""


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_two_processes_purging_at_once_delete_each_file_once(db: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("pg_url") if db == "postgresql" else None
    w = World(tmp_path / "data", url)
    try:
        vids = w.many_delivered(30, n=2)
        files = {v: w.files_of_version(v) for v in vids}
        go = tmp_path / "go"
        ready = [tmp_path / f"ready-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", PURGER, str(w.settings.data_path), url or "", str(go),
                                   str(r)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in ready]
        wait_until(lambda: all(r.exists() for r in ready), what="both purgers ready")
        go.write_text("go")  # released together
        outs = [p.communicate(timeout=PROCESS_TIMEOUT_S) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
        docs = [json.loads(out) for out, _ in outs]
        mine = [{v["version_id"] for v in d["versions"]} for d in docs]
        assert not (mine[0] & mine[1])  # no version purged twice ...
        assert mine[0] | mine[1] == set(vids)  # ... and none left
        assert sum(d["files_removed"] for d in docs) == sum(len(f) for f in files.values())
        assert sum(d["errors"] for d in docs) == 0
        assert not any(p.exists() for f in files.values() for p in f)
        assert [v for v, _ in w.purged_events()] == sorted(vids)  # one event per version
    finally:
        w.close()


def test_purge_time_for_a_hundred_versions(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """The figure for the record (no assertion on time): one pass over 100 delivered versions."""
    w = world
    w.many_delivered(100, n=4)
    t0 = time.perf_counter()
    report = purge(w.settings, w.index, now=time.time() + LATER)
    seconds = time.perf_counter() - t0
    assert len(report.versions) == 100 and report.files_removed == 100 * 6
    with capsys.disabled():
        print(f"\npurge: 100 versions, {report.files_removed} files, {report.bytes_freed / MIB:.1f} MiB in "
              f"{seconds:.2f} s ({w.index.url.split(':')[0]})")


# -- a real node: a late series after a purge, and during purges ------------------------------------


class Pacs:
    """A storage SCP standing in for the PACS: keeps the SOP Instance UIDs of what the node sends."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: Any) -> int:
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def node_and_pacs(tmp_path: Path) -> Iterator[tuple[NodeProcess, Pacs]]:
    pacs = Pacs()
    # confirm = "none": this SCP answers no C-FIND (a failed confirmation would also count as delivered, later)
    node = NodeProcess(tmp_path / "data", destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                                                         "confirm": "none"}],
                       dispatch_retry_initial_s=1, dispatch_retry_max_s=2, dispatch_poll_s=0.5,
                       **RELEASE_COMPLETES)
    node.start()
    yield node, pacs
    node.stop()
    pacs.stop()


def delivered_version(index: Index, settings: Settings, study_uid: str,
                      version: int) -> Callable[[], dict[str, Any] | None]:
    """A predicate: the study's version once its pipeline is done and every delivery sent.

    Polls the status document in this process (what ``dicomnode status --json`` prints, without a process
    start per poll).
    """
    def check() -> dict[str, Any] | None:
        st = next((s for s in full_status(index, settings)["studies"] if s["study_instance_uid"] == study_uid), None)
        v = next((v for v in (st or {}).get("versions", []) if v["version"] == version), None)
        if v and v["pipeline_state"].startswith("failed"):
            raise AssertionError(f"pipeline failed: {v['pipeline']}")
        ok = v and v["pipeline_state"] == "done" and v["deliveries"] and \
            all(d["state"] == "sent" for d in v["deliveries"])
        return v if ok else None
    return check


def converted(index: Index, version: dict[str, Any]) -> dict[str, str | None]:
    """The convert step's outcome per role: None where the series became a volume, else why not."""
    detail = Jobs(index).of_version(version["version_id"])["convert"]["detail"]
    return {role: d["error"] for role, d in detail.items()}


def series(study: str, role: str) -> list[Any]:
    """Eight 16 x 16 slices that identification takes for ``role`` (T1 or T2) and convert makes a volume of."""
    uid = generate_uid()
    desc, tr, te, ti = {"T2": ("t2_tse_tra", 4000, 100, None), "T1": ("t1_mprage_tra", 2000, 3, 900)}[role]
    out = []
    for k in range(8):
        ds = mr_dataset(study, uid, rows=16, cols=16, description=desc, instance=k + 1)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 3.0 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.RepetitionTime, ds.EchoTime = [1, 1], 3, tr, te
        if ti:
            ds.InversionTime = ti
        ds.PixelData = os.urandom(16 * 16 * 2)
        out.append(ds)
    return out


def test_a_node_processes_a_late_series_after_and_during_purges(node_and_pacs: tuple[NodeProcess, Pacs]) -> None:
    node, pacs = node_and_pacs
    settings = Settings().replace(data_dir=str(node.data_dir), retention_days=30, retention_min_free_disk_mb=0)
    index = Index(settings.index_url)
    try:
        # 1. purge, then a late series: version 2 is processed with what is kept and its report arrives
        study = generate_uid()
        assert set(store(node.port, *series(study, "T2"))) == {0}
        v1 = wait_until(delivered_version(index, settings, study, 1), what="version 1 delivered")
        assert converted(index, v1) == {"T2": None}
        report = purge(settings, index, now=time.time() + LATER)
        assert ids(report) == [v1["version_id"]]
        assert node.spool_files() == []
        late = series(study, "T1")
        assert set(store(node.port, *late)) == {0}
        v2 = wait_until(delivered_version(index, settings, study, 2), what="version 2 delivered")
        assert v2["instances_purged"] == 8 and v2["purged_at"] is None
        roles = {s["series_instance_uid"]: s["role"] for s in v2["series"]}
        assert roles[late[0].SeriesInstanceUID] == "T1"  # identified from its kept files ...
        assert list(roles.values()).count(None) == 1  # ... the purged T2 not read at all
        assert converted(index, v2) == {"T1": None}  # converted from the files it has
        assert v2["report"]["available_roles"] == ["T1"]
        # its report says why it reads less than the one it supersedes
        assert any("8 earlier instance(s) of this study were removed by retention" in f
                   for f in v2["report"]["quality_flags"]), v2["report"]["quality_flags"]
        assert {d["sop_instance_uid"] for d in v2["deliveries"]} <= set(pacs.received)
        assert all((node.data_dir / f).is_file() for f in v1["report"]["files"])  # report objects are kept
        shown = next(s for s in node.status()["studies"] if s["study_instance_uid"] == study)  # the CLI shows it
        assert shown["versions"][0]["purged_at"] is not None and shown["versions"][1]["purged_at"] is None

        # 2. a late series stored while purges run: whichever wins, the new version is processed correctly
        study = generate_uid()
        assert set(store(node.port, *series(study, "T2"))) == {0}
        wait_until(delivered_version(index, settings, study, 1), what="version 1 of the second study delivered")
        stop = threading.Event()
        passes: list[PurgeReport] = []
        errors: list[BaseException] = []

        def purging() -> None:
            try:
                while not stop.wait(0.02):  # paced a little, so the node keeps its share of two cores
                    passes.append(purge(settings, index, now=time.time() + LATER))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        t = threading.Thread(target=purging)
        late = series(study, "T1")
        t.start()
        try:
            assert set(store(node.port, *late)) == {0}
            wait_until(delivered_version(index, settings, study, 2), what="version 2 of the second study delivered")
            # the purges go on until every version is purged (version 2 once delivered)
            wait_until(lambda: all(v["purged_at"] for st in index.status()["studies"] for v in st["versions"]),
                       what="every delivered version purged")
        finally:
            stop.set()
            t.join(PROCESS_TIMEOUT_S)
        assert not errors, errors
        assert len(passes) > 1
        first, v2 = next(s for s in full_status(index, settings)["studies"]
                         if s["study_instance_uid"] == study)["versions"]
        roles = {s["series_instance_uid"]: s["role"] for s in v2["series"]}
        assert roles[late[0].SeriesInstanceUID] == "T1"
        with index.engine.connect() as c:  # what version 2 was assembled from (the purges went on after that)
            detail = c.execute(select(EventRow.detail).where(EventRow.kind == "version_complete",
                                                             EventRow.version_id == v2["version_id"])).scalar_one()
        if detail.get("purged_instances"):  # version 1 was purged before version 2 opened: only its own files
            assert detail["purged_instances"] == 8 and list(roles.values()).count(None) == 1
            assert v2["report"]["available_roles"] == ["T1"] and converted(index, v2) == {"T1": None}
        else:  # version 2 opened first: version 1's files stayed until version 2 was delivered
            assert sorted(roles.values()) == ["T1", "T2"] and first["purged_at"] >= v2["completed_at"]
            assert v2["report"]["available_roles"] == ["T1", "T2"]
            assert not any("removed by retention" in f for f in v2["report"]["quality_flags"])
            assert converted(index, v2) == {"T1": None, "T2": None}
        assert {d["sop_instance_uid"] for d in v2["deliveries"]} <= set(pacs.received)
        assert node.spool_files() == []
        log = node.log()
        assert "cannot re-read a stored header" not in log and "not converted" not in log
        assert "step_failed" not in {e["kind"] for e in index.recent_events(500)}
    finally:
        index.close()
