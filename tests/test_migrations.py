"""Schema migrations of the index, on SQLite and on a real PostgreSQL.

The promise under test: the first schema change after a site installs the
node does not break that site. So: revision 0001 is exactly what release 1
made with ``create_all``; a release-1 database (``tests/data/index-v1.sql``,
made by ``tests/data/make_index_v1.py`` from a frozen copy of release 1's
table definitions) is adopted, upgraded, and every row stays readable through
the node's own APIs; the model (``schema.py``) equals the head revision;
several processes starting at once create the schema exactly once; and a
database a newer node has written is refused, not misread.
"""
from __future__ import annotations

import importlib.util
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import Engine

from dicomnode.config import Settings
from dicomnode.index import migrate
from dicomnode.index.jobs import Jobs
from dicomnode.index.reports import Reports
from dicomnode.index.schema import Base
from dicomnode.index.studies import Index, InstanceMeta
from dicomnode.stages.dispatch import Outbox
from nodeutil import wait_until

DATA = Path(__file__).resolve().parent / "data"
DUMP = DATA / "index-v1.sql"
HEAD = "0003"


def _load_v1() -> ModuleType:
    """``tests/data/make_index_v1.py``: release 1's frozen table definitions and the dump's rows."""
    spec = importlib.util.spec_from_file_location("make_index_v1", DATA / "make_index_v1.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_index_v1", module)
    spec.loader.exec_module(module)
    return module


V1 = _load_v1()
OLD_TABLES = V1.OldBase.metadata.sorted_tables  # parents first


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    eng = create_engine(url)
    yield eng
    eng.dispose()


def snapshot(engine: Engine) -> dict[str, Any]:
    """Everything about a schema that reflection sees, normalised for comparison (alembic_version excluded)."""
    insp = inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        out[table] = {
            "columns": [(c["name"], str(c["type"].compile(dialect=engine.dialect)), c["nullable"], c.get("default"))
                        for c in insp.get_columns(table)],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]),
                           f.get("name") or "") for f in insp.get_foreign_keys(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in insp.get_indexes(table)),
            "unique": sorted((u.get("name") or "", tuple(u["column_names"]))
                             for u in insp.get_unique_constraints(table)),
            "checks": sorted((c.get("name") or "", c["sqltext"]) for c in insp.get_check_constraints(table)),
        }
    return out


def old_rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of release 1's tables, read through release 1's own definitions (types converted alike)."""
    with engine.connect() as c:
        return {t.name: [dict(r) for r in c.execute(select(t).order_by(*t.primary_key.columns)).mappings()]
                for t in OLD_TABLES}


def load_dump(path: Path) -> str:
    con = sqlite3.connect(path)
    con.executescript(DUMP.read_text(encoding="utf-8"))
    con.close()
    return f"sqlite:///{path}"


def release1_database(url: str, tmp_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Make ``url`` a release-1 index holding the dump's rows; return those rows as release 1 reads them.

    SQLite: the dump itself. PostgreSQL: release 1's ``create_all``, then the
    same rows copied over (the dump's SQL is SQLite's dialect).
    """
    source = create_engine(load_dump(tmp_path / "dump.db"))
    rows = old_rows(source)
    source.dispose()
    if url.startswith("sqlite"):
        load_dump(Path(url.removeprefix("sqlite:///")))
        return rows
    target = create_engine(url)
    V1.OldBase.metadata.create_all(target)  # exactly what release 1's Index() did
    with target.begin() as c:
        for table in OLD_TABLES:
            if rows[table.name]:
                c.execute(table.insert(), rows[table.name])
            if "id" in table.c:  # explicit ids do not advance PostgreSQL's sequences; release 1's inserts did
                c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                               f"(SELECT max(id) FROM {table.name}))"))
    target.dispose()
    return rows


def meta_value(engine: Engine) -> str | None:
    with engine.connect() as c:
        return c.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()


# -- revision 0001 is release 1, head is the model ------------------------------------------------


def test_revision_0001_is_exactly_what_release_1_created(url: str, engine: Engine) -> None:
    V1.OldBase.metadata.create_all(engine)
    release1 = snapshot(engine)
    V1.OldBase.metadata.drop_all(engine)
    assert snapshot(engine) == {}
    assert migrate.upgrade(url, "0001") == "0001"
    assert snapshot(engine) == release1
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                V1.OldBase.metadata) == []


def test_model_metadata_equals_the_head_of_the_migrations(url: str, engine: Engine) -> None:
    assert migrate.head_revision() == HEAD
    assert migrate.upgrade(url) == HEAD
    with engine.connect() as c:
        diffs = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    assert diffs == [], f"schema.py and the migrations differ; add a revision: {diffs}"
    assert migrate.current_revision(url) == HEAD and meta_value(engine) == HEAD
    assert migrate.check_at_head(url) == HEAD


def test_migrations_are_found_inside_the_package() -> None:
    """No alembic.ini at run time: the revisions are located next to the installed module."""
    cfg = migrate.alembic_config()
    assert cfg.config_file_name is None
    location = Path(cfg.get_main_option("script_location") or "")
    assert location == Path(migrate.__file__).resolve().parent / "migrations"
    assert (location / "env.py").is_file()
    assert migrate.known_revisions() == {"0001", "0002", "0003"}


# -- a site's release-1 database ----------------------------------------------------------------------


def test_release_1_database_is_stamped_upgraded_and_every_row_survives(
        url: str, engine: Engine, tmp_path: Path) -> None:
    before = release1_database(url, tmp_path)
    assert before["studies"] and before["deliveries"] and meta_value(engine) == "1"
    assert migrate.current_revision(url) is None
    with pytest.raises(migrate.SchemaError, match=r"no schema revision \(made by release 1\).*dicomnode db upgrade"):
        Index(url, migrate=False)

    ix = Index(url)
    try:
        assert migrate.current_revision(url) == HEAD and meta_value(engine) == HEAD
        after = old_rows(engine)
        after["meta"] = [r for r in after["meta"] if r["key"] != "schema_version"]
        before["meta"] = [r for r in before["meta"] if r["key"] != "schema_version"]
        assert after == before

        # readable through the node's own APIs
        (study,) = ix.status()["studies"]
        assert (study["study_instance_uid"], study["instances"], study["duplicates"]) == (V1.STUDY, 4, 1)
        (version,) = study["versions"]
        assert (version["state"], version["complete_reason"]) == ("complete", "quiet_period")
        assert {s["role"] for s in version["series"]} == {"T1", "FLAIR"}
        assert ix.completed_versions()[0].study_instance_uid == V1.STUDY
        assert [e["kind"] for e in ix.recent_events()] == [
            "version_opened", "duplicate_instance", "version_complete", "delivery_queued"]
        assert ix.is_own_object(V1.SR_SOP)
        steps = Jobs(ix).of_version(1)
        assert list(steps) == list(V1.STAGES) and {s["state"] for s in steps.values()} == {"done"}
        report = Reports(ix, tmp_path).by_version()[1]
        assert report["sr_sop_instance_uid"] == V1.SR_SOP and report["report_sent"] is True
        outbox = Outbox(ix, Settings().replace(data_dir=str(tmp_path)))
        (delivery,) = outbox.status()
        assert (delivery["state"], delivery["destination"], delivery["sop_instance_uid"]) == ("sent", V1.DEST, V1.SR_SOP)
        assert outbox.summary() == {"pending": 0, "sent": 1, "parked": 0, "total": 1}

        # revision 0002 is there
        insp = inspect(engine)
        assert "purged_at" in {c["name"] for c in insp.get_columns("study_versions")}
        assert ("ix_events_version_id", ["version_id"]) in [(i["name"], i["column_names"])
                                                            for i in insp.get_indexes("events")]
        with engine.begin() as c:
            c.execute(text("UPDATE study_versions SET purged_at = 1714999999.5 WHERE id = 1"))
            assert c.execute(text("SELECT purged_at FROM study_versions WHERE id = 1")).scalar() == 1714999999.5

        # and writable: new rows get fresh ids next to the old ones
        out = ix.add_instance(InstanceMeta(generate_uid(), V1.MR, V1.EXPLICIT_LE, generate_uid(), generate_uid(),
                                           "MR", 1, "t1", True), "spool/store/new/1.dcm", 10, "SCU", "127.0.0.1")
        assert out.study_id == 2 and out.version == 1
        assert Jobs(ix).create(2, out.study_id, "convert")
    finally:
        ix.close()
    # a second start finds it at head and changes nothing
    Index(url, migrate=False).close()
    assert migrate.current_revision(url) == HEAD


def test_a_table_set_it_cannot_identify_is_refused_untouched(url: str, engine: Engine) -> None:
    """Our table names without release 1's marker: adopting it could destroy someone's data."""
    V1.OldBase.metadata.create_all(engine, tables=[V1.Study.__table__])
    with pytest.raises(migrate.SchemaError, match="not a release-1 index"):
        Index(url)
    assert set(inspect(engine).get_table_names()) == {"studies"}


# -- behind and ahead ------------------------------------------------------------------------------------


def test_behind_is_upgraded_or_refused_when_not_migrating(url: str, engine: Engine) -> None:
    migrate.upgrade(url, "0001")
    with pytest.raises(migrate.SchemaError, match=r"has revision 0001 but this dicomnode expects revision 0003"):
        migrate.check_at_head(url)
    with pytest.raises(migrate.SchemaError, match="dicomnode db upgrade"):
        Index(url, migrate=False)
    Index(url).close()
    assert migrate.current_revision(url) == HEAD


def test_a_database_written_by_a_newer_node_is_refused(url: str, engine: Engine) -> None:
    migrate.upgrade(url)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    for attempt in (lambda: Index(url), lambda: Index(url, migrate=False), lambda: migrate.check_at_head(url),
                    lambda: migrate.upgrade(url)):
        with pytest.raises(migrate.SchemaError, match=r"revision 0099, newer than this dicomnode's 0003") as err:
            attempt()
        assert "downgrade" in str(err.value) and str(err.value).count(". ") == 0  # one sentence
    assert migrate.current_revision(url) == "0099"  # nothing was touched


def test_downgrade_returns_to_release_1_schema_and_upgrade_again(url: str, engine: Engine, tmp_path: Path) -> None:
    V1.OldBase.metadata.create_all(engine)
    release1 = snapshot(engine)
    V1.OldBase.metadata.drop_all(engine)
    before = release1_database(url, tmp_path)
    migrate.upgrade(url)
    assert migrate.downgrade(url, "0001") == "0001"
    assert snapshot(engine) == release1
    assert {k: v for k, v in old_rows(engine).items() if k != "meta"} == \
        {k: v for k, v in before.items() if k != "meta"}
    assert migrate.upgrade(url) == HEAD and meta_value(engine) == HEAD


# -- several processes starting at once ----------------------------------------------------------------------

_START = """
import logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
from dicomnode.index.studies import Index
gate = Path(sys.argv[2])
(gate / f"ready-{os.getpid()}").touch()
while not (gate / "go").exists():
    time.sleep(0.001)
Index(sys.argv[1]).close()
"""


def test_processes_starting_at_once_create_the_schema_exactly_once(url: str, engine: Engine, tmp_path: Path) -> None:
    # A start line, not a start time: each process says when it has imported the node, and all are let go
    # together once all four have (a fixed "now + 5 s" was passed by slow imports on a loaded machine).
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _START, url, str(gate)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    try:
        wait_until(lambda: len(list(gate.glob("ready-*"))) == 4 or any(p.poll() is not None for p in procs),
                   what="four processes ready")
    finally:
        (gate / "go").touch()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert sum(o.count("creating the index schema") for o in outputs) == 1, outputs
    assert sum(o.count("Running upgrade 0001 -> 0002") for o in outputs) == 1, outputs
    assert sum(o.count("Running upgrade 0002 -> 0003") for o in outputs) == 1, outputs
    with engine.connect() as c:
        assert list(c.execute(text("SELECT version_num FROM alembic_version")).scalars()) == [HEAD]
    assert meta_value(engine) == HEAD
