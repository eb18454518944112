"""Alembic's environment for the index.

The node runs migrations through :mod:`dicomnode.index.migrate`, which builds
the :class:`alembic.config.Config` in code and hands over a connection that
already holds the migration lock inside an open transaction (``config.attributes
["connection"]``). Alembic then runs inside *that* transaction and does not
commit: the caller commits once, so a failed upgrade leaves the database as it
was (PostgreSQL and SQLite both have transactional DDL).

Without a connection (a developer running the ``alembic`` command with an
``alembic.ini`` that sets ``sqlalchemy.url``) it opens its own, unlocked:
fine on a developer's copy, not what a running site uses.

Logging is deliberately not configured here (no ``fileConfig``): the node
owns its logging, and a migration must not replace its handlers.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Connection

from dicomnode.index.schema import Base

config = context.config
# Only autogenerate reads the model: the revisions themselves are frozen and never import it.
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: autogenerate then writes batch (copy-and-move) operations.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: the SQL for a DBA to review or run by hand."""
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():  # a no-op inside the caller's transaction
            context.run_migrations()
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url configured; use dicomnode.index.migrate")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
