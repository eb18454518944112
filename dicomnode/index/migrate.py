"""Bring the index database to the schema this code expects, or refuse to start.

Why: a site installs the node once and then upgrades it in place; the index
is the authoritative record (every acknowledged instance, every report owed
to a PACS), so a schema change must reach an existing database without
losing a row, and a node must never write to a database whose schema it does
not know. Alembic's revisions (``dicomnode/index/migrations/versions``) are
the single description of every schema the node has had; this module runs
them.

* :func:`upgrade` migrates to the head revision. ``Index(url)`` calls it at
  start-up (node, workers, tests); operators can run it ahead of time
  (``dicomnode db upgrade``).
* :func:`check_at_head` refuses with a :class:`SchemaError` when the database
  is behind (not yet upgraded) or AHEAD (a newer node wrote it: this code
  would misread its rows; nothing is downgraded automatically).
* :func:`current_revision` is what ``dicomnode db current`` shows.

Release 1 created its tables with ``create_all`` and recorded
``meta.schema_version = '1'``, with no ``alembic_version`` table. Its tables
are exactly revision 0001, so such a database is *stamped* 0001 (nothing else
is touched) and then upgraded like any other. ``meta.schema_version`` is kept
as a mirror of the Alembic revision (``'0002'``...): release 1 only writes it
when it is missing and never compares it, so an older node that still opens
the database is not disturbed; ``alembic_version`` is the authority.

Concurrency: the node, its workers and other hosts may all start at once
against one database; exactly one of them may migrate. Every migration runs
in ONE transaction that first takes a lock, then reads the revision, then
migrates and commits; the others wait for the lock, then read the committed
revision and find nothing to do. A failed migration rolls back completely
(both databases have transactional DDL).

* PostgreSQL: ``pg_advisory_xact_lock`` (released at commit or rollback, so a
  crashed process cannot leave it held; scoped to the one database).
* SQLite: the transaction starts with ``BEGIN IMMEDIATE``, which takes the
  database's write lock at once (waiting up to the busy timeout), on a
  dedicated connection whose driver does not manage transactions itself
  (Python's sqlite3 module otherwise runs DDL outside any transaction).
  Foreign keys are left off on that connection, as SQLite requires for the
  copy-and-move table rebuilds of batch migrations.

A start-up that finds the database already at head takes no lock at all.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, pool, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: What release 1 wrote to ``meta.schema_version``, and the revision its tables are.
LEGACY_SCHEMA_VERSION = "1"
LEGACY_REVISION = "0001"
#: Release 1's tables: a database holding any of them is not fresh.
LEGACY_TABLES = frozenset({"studies", "study_versions", "series", "instances", "version_series", "events",
                           "own_objects", "meta", "jobs", "reports", "deliveries"})
#: ``pg_advisory_xact_lock`` key of the index migration (any constant; advisory locks are per database).
PG_LOCK_KEY = 0x64636D6E_6D696772  # "dcmnmigr"

UPGRADE_COMMAND = "dicomnode db upgrade"

EngineOrUrl = Engine | URL | str

# alembic.context is a process-wide proxy: two threads of one process must not run env.py at once.
_alembic_lock = threading.Lock()


class SchemaError(RuntimeError):
    """The index database is not at the schema this code expects (behind, ahead, or not ours)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration built in code: no ``alembic.ini`` is needed on a site.

    ``script_location`` is the installed package's own ``migrations`` folder,
    so the revisions that run are always the ones shipped with this code.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows (its schema.py equals it)."""
    head = _script().get_current_head()
    assert head is not None, "no migrations found"
    return head


@lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in _script().walk_revisions())


def _where(url: URL) -> str:
    return url.render_as_string(hide_password=True)


@contextmanager
def _engine(db: EngineOrUrl) -> Iterator[Engine]:
    """The given engine, or a short-lived one for a URL (disposed afterwards)."""
    if isinstance(db, Engine):
        yield db
        return
    engine = create_engine(db, poolclass=pool.NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def _sqlite_migration_engine(url: URL) -> Engine:
    """A connection that starts every transaction with BEGIN IMMEDIATE (see the module docstring)."""
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver issues no BEGIN/COMMIT of its own; we do
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def _locked(db: EngineOrUrl) -> Iterator[Connection]:
    """One transaction holding the migration lock; committed when the block ends without error."""
    url = db.url if isinstance(db, Engine) else make_url(db)
    owned: Engine | None = None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        engine = owned = _sqlite_migration_engine(url)
    elif isinstance(db, Engine):
        engine = db  # PostgreSQL (or an in-memory SQLite, which no other process can see)
    else:
        engine = owned = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn
    finally:
        if owned is not None:
            owned.dispose()


def _revision_of(conn: Connection) -> str | None:
    """``alembic_version``'s row, read directly (a MigrationContext would log two lines at every start-up)."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    if len(rows) > 1:
        raise SchemaError(f"index database {_where(conn.engine.url)} has several schema revisions "
                          f"({', '.join(sorted(rows))}); the node's migrations are linear, so someone branched "
                          f"them by hand: resolve with alembic before starting the node.")
    return rows[0] if rows else None


def current_revision(db: EngineOrUrl) -> str | None:
    """The database's Alembic revision; None for an empty database or one release 1 made (not yet stamped)."""
    with _engine(db) as engine, engine.connect() as conn:
        return _revision_of(conn)


def _refusal(url: URL, found: str | None, *, legacy: bool = False) -> SchemaError | None:
    """None when ``found`` is head; else the one-sentence reason to refuse."""
    head = head_revision()
    if found == head:
        return None
    where = _where(url)
    if found is not None and found not in known_revisions():
        return SchemaError(
            f"index database {where} is at schema revision {found}, newer than this dicomnode's {head} "
            f"(a newer dicomnode upgraded it): install that newer dicomnode here, or restore the backup taken "
            f"before its upgrade; this node never downgrades a database.")
    what = (f"revision {found}" if found else
            "no schema revision (made by release 1)" if legacy else "no schema (empty)")
    return SchemaError(f"index database {where} has {what} but this dicomnode expects revision {head}: "
                       f"back it up and run `{UPGRADE_COMMAND}`.")


def _refuse_if_ahead(conn: Connection, found: str | None) -> None:
    """A revision this code does not know was written by a newer node: Alembic could not even walk from it."""
    if found is not None and found not in known_revisions():
        refusal = _refusal(conn.engine.url, found)
        assert refusal is not None
        raise refusal


def _is_legacy(conn: Connection) -> bool:
    """True for an unstamped database with release 1's tables; raises if it has some of ours but is not that."""
    tables = set(inspect(conn).get_table_names())
    ours = tables & LEGACY_TABLES
    if not ours:
        return False
    marker = None
    if "meta" in tables:
        marker = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
    missing = sorted(LEGACY_TABLES - tables)
    if marker != LEGACY_SCHEMA_VERSION or missing:
        raise SchemaError(
            f"index database {_where(conn.engine.url)} has dicomnode tables ({', '.join(sorted(ours))}) but no "
            f"alembic_version, meta.schema_version {marker!r} and missing tables {missing or 'none'}: it is not a "
            f"release-1 index this node can adopt; restore it from a backup or point database_url elsewhere.")
    return True


def check_at_head(db: EngineOrUrl) -> str:
    """Raise :class:`SchemaError` unless the database is at this code's head revision; return that revision.

    For processes that must not migrate (``Index(url, migrate=False)``): they
    start only once the database is exactly at the schema they were written for.
    """
    with _engine(db) as engine, engine.connect() as conn:
        found = _revision_of(conn)
        refusal = _refusal(engine.url, found, legacy=found is None and _is_legacy(conn))
    if refusal is not None:
        raise refusal
    return head_revision()


def _sync_meta(conn: Connection, revision: str) -> None:
    """Mirror the revision into ``meta.schema_version`` (for older readers and people reading the table)."""
    if "meta" not in inspect(conn).get_table_names():
        return
    value = conn.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
    if value is None:
        conn.execute(text("INSERT INTO meta (key, value) VALUES ('schema_version', :v)"), {"v": revision})
    elif value != revision:
        conn.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"), {"v": revision})


def upgrade(db: EngineOrUrl, revision: str = "head") -> str:
    """Migrate the database to ``revision`` (default: this code's head); return the revision it is at.

    A fresh database gets every table through the revisions; a release-1
    database is stamped 0001 first. Refuses (:class:`SchemaError`) a database
    a newer node has upgraded, and one with our tables that it cannot
    identify. Safe to call from several processes at once (see the module
    docstring); cheap when the database is already at head.
    """
    target = head_revision() if revision == "head" else revision
    with _engine(db) as engine, engine.connect() as conn:  # fast path: no lock when nothing is to do
        if _revision_of(conn) == target:
            return target
    with _alembic_lock, _locked(db) as conn:
        found = _revision_of(conn)
        _refuse_if_ahead(conn, found)
        cfg = alembic_config(conn)
        if found is None and _is_legacy(conn):
            log.warning("index database %s was made by release 1 (meta.schema_version=1, no alembic_version): "
                        "stamping it as revision %s", _where(conn.engine.url), LEGACY_REVISION)
            command.stamp(cfg, LEGACY_REVISION)
            found = LEGACY_REVISION
        if found is None:
            log.info("creating the index schema in %s (revision %s)", _where(conn.engine.url), target)
        elif found != target:
            log.warning("upgrading index database %s from schema revision %s to %s",
                        _where(conn.engine.url), found, target)
        if found != target:
            command.upgrade(cfg, target)
        now = _revision_of(conn) or target
        _sync_meta(conn, now)
    return now


def downgrade(db: EngineOrUrl, revision: str) -> str:
    """Migrate the database back to ``revision`` (an operator's rollback; never done automatically).

    Data held only by what is removed (for example ``study_versions.purged_at``)
    is lost: take a backup first.
    """
    with _alembic_lock, _locked(db) as conn:
        _refuse_if_ahead(conn, _revision_of(conn))
        command.downgrade(alembic_config(conn), revision)
        now = _revision_of(conn)
        if now is not None:
            _sync_meta(conn, now)
    return now or "base"
