"""The index on SQLite and on a real PostgreSQL: versions, races, completion."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.index.studies import Index, InstanceMeta
from nodeutil import RELEASE_COMPLETES, NodeProcess, mr_dataset, store

@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    ix = Index(url)
    yield ix
    ix.close()


def meta(study: str, series: str, sop: str | None = None) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid=sop or generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        study_instance_uid=study,
        series_instance_uid=series,
        modality="MR",
        series_number=1,
        series_description="t1",
        gradable=True,
    )


def test_concurrent_arrivals_make_one_study_one_version(index: Index) -> None:
    study = generate_uid()
    series = [generate_uid() for _ in range(4)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for k in range(15):
                index.add_instance(meta(study, series[k % 4]), f"spool/store/x/{t}-{k}.dcm", 10, "SCU", "127.0.0.1")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    doc = index.status()
    (st,) = doc["studies"]
    assert st["instances"] == 90
    assert [v["version"] for v in st["versions"]] == [1]
    assert len(st["versions"][0]["series"]) == 4


def test_completion_waits_for_quiet_and_late_arrival_opens_next_version(index: Index) -> None:
    study, series = generate_uid(), generate_uid()
    index.add_instance(meta(study, series), "spool/store/x/a.dcm", 10, "SCU", None, now=1000.0)
    assert index.due_versions(1004.0, 5.0, None) == []
    (due,) = index.due_versions(1005.0, 5.0, None)
    # an arrival between the query and the completion wins: the version stays open
    index.add_instance(meta(study, series), "spool/store/x/b.dcm", 10, "SCU", None, now=1004.5)
    assert not index.complete_version(due, {}, 1005.0)
    (due,) = index.due_versions(1010.0, 5.0, None)
    roles = {series: {"role": "T1", "status": "selected", "reason": "test", "evidence": [], "chosen_over": []}}
    assert index.complete_version(due, roles, 1010.0)
    index.add_instance(meta(study, series), "spool/store/x/c.dcm", 10, "SCU", None, now=1020.0)
    (st,) = index.status()["studies"]
    assert [(v["version"], v["state"]) for v in st["versions"]] == [(1, "complete"), (2, "receiving")]
    assert [f.path for f in index.version_files(due.study_id, 2)] == [
        "spool/store/x/a.dcm", "spool/store/x/b.dcm", "spool/store/x/c.dcm"]
    assert st["versions"][0]["series"][0]["role"] == "T1"


def test_duplicate_sop_instance_is_refused_by_the_index(index: Index) -> None:
    from sqlalchemy.exc import IntegrityError

    m = meta(generate_uid(), generate_uid())
    index.add_instance(m, "spool/store/x/a.dcm", 10, "SCU", None)
    with pytest.raises(IntegrityError):
        index.add_instance(m, "spool/store/x/b.dcm", 10, "SCU", None)
    index.count_duplicate(m.sop_instance_uid, "SCU", "127.0.0.1")
    assert index.status()["studies"][0]["duplicates"] == 1


def test_node_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    # completes on store()'s clean release: a 1 s quiet period could end inside a stalled association
    node = NodeProcess(tmp_path / "data", database_url=pg_url, **RELEASE_COMPLETES).start()
    try:
        study = generate_uid()
        assert store(node.port, *[mr_dataset(study, generate_uid()) for _ in range(3)]) == [0, 0, 0]
        doc = node.wait_for(lambda d: d["studies"] and d["studies"][0]["versions"][0]["state"] == "complete")
        assert doc["studies"][0]["instances"] == 3
        assert not (node.data_dir / "index.sqlite3").exists()
    finally:
        node.stop()


def test_id_cache_is_bounded() -> None:
    from dicomnode.index.studies import BoundedCache

    cache = BoundedCache(3)
    for k in range(10):
        cache[("series", str(k))] = k
    assert len(cache) == 3 and cache.get(("series", "0")) is None
    assert cache.get(("series", "9")) == 9
