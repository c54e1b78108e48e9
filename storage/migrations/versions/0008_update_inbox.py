"""Received updates are kept before they are acknowledged, and marked done after their handlers:
``processed_updates`` gains the update's content, the process holding it and its lease, the number
of attempts, and when it was done.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

import storage.db

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("processed_updates") as batch:
        batch.add_column(sa.Column("payload", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("leased_until", storage.db.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("attempts", storage.db.BigInt, server_default="0", nullable=False))
        batch.add_column(sa.Column("done_at", storage.db.UTCDateTime(timezone=True), nullable=True))
    # Every update recorded before this revision was claimed by the old rule: it counts as done.
    op.execute("UPDATE processed_updates SET done_at = processed_at")


def downgrade() -> None:
    with op.batch_alter_table("processed_updates") as batch:
        for column in ("done_at", "attempts", "leased_until", "worker", "payload"):
            batch.drop_column(column)
