"""The staff group's current id and availability (a supergroup upgrade, the bot removed).

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

import storage.db

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "staff_chat",
        sa.Column("configured_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=False, nullable=False),
        sa.Column("chat_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("changed_at", storage.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("migrated_at", storage.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("configured_id"),
    )


def downgrade() -> None:
    op.drop_table("staff_chat")
