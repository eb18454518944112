"""Pipeline steps as index rows: claims, takeover from a dead worker, parking, reconcile, on SQLite and PostgreSQL."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.index.studies import Index, InstanceMeta
from dicomnode.index.jobs import Jobs, holder_id, holder_is_dead


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    ix = Index(url)
    yield ix
    ix.close()


def completed_version(index: Index) -> tuple[int, int]:
    study, series = generate_uid(), generate_uid()
    out = index.add_instance(InstanceMeta(generate_uid(), "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", study,
                                          series, "MR", 1, "t1", True), f"x/{generate_uid()}.dcm", 10, "A", "127.0.0.1")
    due = index.due_versions(time.time() + 100, 1.0, None)[0]
    assert index.complete_version(due, {series: {"role": "T1", "status": "selected", "reason": "test"}}, time.time())
    return due.version_id, out.study_id


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_finish_creates_the_next_step_and_a_second_delivery_does_nothing(index: Index) -> None:
    jobs = Jobs(index)
    vid, sid = completed_version(index)
    assert jobs.create(vid, sid, "convert")
    assert not jobs.create(vid, sid, "convert")
    me = holder_id()
    c = jobs.claim(vid, "convert", holder=me, lease_s=60, max_deliveries=3)
    assert (c.outcome, c.study_id, c.deliveries) == ("run", sid, 1)
    assert jobs.claim(vid, "convert", holder=me, lease_s=60, max_deliveries=3).outcome == "busy"
    assert jobs.finish(vid, "convert", holder=me, seconds=0.5, detail={"T1": "ok"}, next_stage="preprocess")
    assert jobs.claim(vid, "convert", holder=me, lease_s=60, max_deliveries=3).outcome == "done"
    steps = jobs.of_version(vid)
    assert steps["convert"]["state"] == "done" and steps["convert"]["seconds"] == 0.5
    assert steps["preprocess"]["state"] == "pending"


def test_only_one_of_many_concurrent_deliveries_runs(index: Index) -> None:
    jobs = Jobs(index)
    vid, sid = completed_version(index)
    jobs.create(vid, sid, "infer")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def deliver(k: int) -> None:
        barrier.wait()
        outcomes.append(jobs.claim(vid, "infer", holder=f"otherhost:{k}", lease_s=60, max_deliveries=10).outcome)

    threads = [threading.Thread(target=deliver, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy"] * 5 + ["run"]


def test_a_step_whose_local_worker_died_is_requeued_and_taken_over(index: Index) -> None:
    jobs = Jobs(index)
    vid, sid = completed_version(index)
    jobs.create(vid, sid, "infer")
    ghost = f"{holder_id().rpartition(':')[0]}:{dead_pid()}"
    assert holder_is_dead(ghost) and not holder_is_dead(holder_id())
    assert jobs.claim(vid, "infer", holder=ghost, lease_s=3600, max_deliveries=3).outcome == "run"
    jobs.mark_sent(vid, "infer", now=time.time() - 10)  # the message sent before the worker took it
    # a periodic reconcile re-sends it once (its worker is gone although the lease has not run out) ...
    assert [(r.version_id, r.stage) for r in jobs.unfinished(pending_resend_after_s=3600)] == [(vid, "infer")]
    jobs.mark_sent(vid, "infer")
    assert jobs.unfinished(pending_resend_after_s=3600) == []  # ... not once per pass
    c = jobs.claim(vid, "infer", holder=holder_id(), lease_s=3600, max_deliveries=3)
    assert (c.outcome, c.deliveries) == ("run", 2)
    # a holder on another host is trusted until its lease runs out (judged on the given clock, not a sleep:
    # a 0.2 s lease could run out before the first look on a loaded machine)
    jobs.create(vid, sid, "report")
    t = time.time()
    assert jobs.claim(vid, "report", holder="elsewhere:1", lease_s=60, max_deliveries=3, now=t).outcome == "run"
    assert all(r.stage != "report" for r in jobs.unfinished(now=t + 59))
    assert any(r.stage == "report" for r in jobs.unfinished(now=t + 60))


def test_a_step_that_keeps_losing_its_worker_is_parked_then_retried_by_an_operator(index: Index) -> None:
    jobs = Jobs(index)
    vid, sid = completed_version(index)
    jobs.create(vid, sid, "infer")
    for k in range(2):
        ghost = f"{holder_id().rpartition(':')[0]}:{dead_pid()}"
        assert jobs.claim(vid, "infer", holder=ghost, lease_s=3600, max_deliveries=2).outcome == "run"
    c = jobs.claim(vid, "infer", holder=holder_id(), lease_s=3600, max_deliveries=2)
    assert c.outcome == "parked"
    step = jobs.of_version(vid)["infer"]
    assert step["state"] == "failed" and "delivered 3 times" in step["error"]
    assert any(e["kind"] == "step_parked" for e in index.recent_events())
    assert jobs.unfinished() == []
    assert [(r.version_id, r.stage) for r in jobs.retry(vid)] == [(vid, "infer")]
    assert jobs.claim(vid, "infer", holder=holder_id(), lease_s=60, max_deliveries=2).outcome == "run"


def test_a_failed_step_records_its_error_and_is_not_requeued(index: Index) -> None:
    jobs = Jobs(index)
    vid, sid = completed_version(index)
    jobs.create(vid, sid, "convert")
    me = holder_id()
    jobs.claim(vid, "convert", holder=me, lease_s=60, max_deliveries=3)
    jobs.fail(vid, "convert", holder=me, error="ValueError: boom", seconds=0.1)
    assert jobs.of_version(vid)["convert"]["error"] == "ValueError: boom"
    assert jobs.unfinished() == []
    assert any(e["kind"] == "step_failed" for e in index.recent_events())


def test_only_the_holder_can_finish(index: Index) -> None:
    jobs = Jobs(index)
    vid, sid = completed_version(index)
    jobs.create(vid, sid, "convert")
    jobs.claim(vid, "convert", holder="a:1", lease_s=0.0, max_deliveries=3)
    jobs.claim(vid, "convert", holder=holder_id(), lease_s=60, max_deliveries=3)  # lease ran out: taken over
    assert not jobs.finish(vid, "convert", holder="a:1", seconds=1, detail={}, next_stage="preprocess")
    assert jobs.finish(vid, "convert", holder=holder_id(), seconds=1, detail={}, next_stage="preprocess")
