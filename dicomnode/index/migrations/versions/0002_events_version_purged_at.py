"""Index ``events(version_id)``; add ``study_versions.purged_at``.

Revision ID: 0002
Revises: 0001

Why: the pipeline and operators look events up per study version (step
failures, parked steps, deliveries queued), which scanned the whole log; and
retention will record when a version's files were purged (NULL: not purged),
so a purge can be resumed and reported instead of being inferred from missing
files. Both changes are additive: a release-1 node that still opens the
database ignores them.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_events_version_id", "events", ["version_id"], unique=False)
    # ADD COLUMN of a nullable column: a plain ALTER on SQLite and PostgreSQL, no table rewrite
    op.add_column("study_versions", sa.Column("purged_at", sa.Float(), nullable=True))


def downgrade() -> None:
    # batch: on SQLite a copy-and-move of the table (older SQLite has no DROP COLUMN), a plain ALTER elsewhere
    with op.batch_alter_table("study_versions") as batch:
        batch.drop_column("purged_at")
    op.drop_index("ix_events_version_id", table_name="events")
