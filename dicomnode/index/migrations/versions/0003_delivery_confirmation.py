"""Add the confirmation columns to ``deliveries`` (confirmed delivery: storage commitment or C-FIND).

Revision ID: 0003
Revises: 0002

Why: a C-STORE Success only says the PACS received the object; the node now
asks the PACS to vouch for it (docs/dispatch.md, "Confirmed delivery") and
sends it again when the PACS lost it. What it must remember across restarts
and hosts: where the confirmation stands, the Transaction UID of the last
N-ACTION (a report can arrive on a new association, to any process sharing
the index), how often it asked, when to ask next, why it could not, and when
the PACS confirmed. Additive: rows sent before this revision keep
``confirmation`` NULL and are shown as sent without confirmation; a node of
revision 0002 that still opens the database ignores the columns.
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ADD COLUMN of nullable columns (and one NOT NULL with a constant default): a plain ALTER on SQLite
    # and PostgreSQL, no table rewrite
    op.add_column("deliveries", sa.Column("confirmation", sa.String(length=16), nullable=True))
    op.add_column("deliveries", sa.Column("confirm_txn_uid", sa.String(length=64), nullable=True))
    op.add_column("deliveries", sa.Column("confirm_attempts", sa.Integer(), server_default="0", nullable=False))
    op.add_column("deliveries", sa.Column("confirm_next_at", sa.Float(), nullable=True))
    op.add_column("deliveries", sa.Column("confirm_error", sa.Text(), nullable=True))
    op.add_column("deliveries", sa.Column("confirmed_at", sa.Float(), nullable=True))
    op.create_index("ix_deliveries_confirm_due", "deliveries", ["confirmation", "confirm_next_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_deliveries_confirm_due", table_name="deliveries")
    # batch: on SQLite a copy-and-move of the table (older SQLite has no DROP COLUMN), a plain ALTER elsewhere
    with op.batch_alter_table("deliveries") as batch:
        for column in ("confirmed_at", "confirm_error", "confirm_next_at", "confirm_attempts", "confirm_txn_uid",
                       "confirmation"):
            batch.drop_column(column)
