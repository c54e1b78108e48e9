"""Reference desk (#16): the answer base, desk duty, conversations with their messages, saved replies.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

import storage.db

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = storage.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "reference_answers",
        sa.Column("id", BIG, nullable=False),
        sa.Column("question_zh", sa.Text(), nullable=False),
        sa.Column("question_en", sa.Text(), nullable=False),
        sa.Column("answer_zh", sa.Text(), nullable=False),
        sa.Column("answer_en", sa.Text(), nullable=False),
        sa.Column("tags", sa.String(length=256), nullable=False),
        sa.Column("added_by", BIG, nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "reference_duty",
        sa.Column("telegram_id", BIG, autoincrement=False, nullable=False),
        sa.Column("since", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("telegram_id"),
    )
    op.create_table(
        "reference_conversations",
        sa.Column("id", BIG, nullable=False),
        sa.Column("reader_id", BIG, nullable=True),
        sa.Column("lang", sa.String(length=8), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("offered", sa.String(length=64), nullable=False),
        sa.Column("answered_by", BIG, nullable=True),
        sa.Column("staff_id", BIG, nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("queued_at", WHEN, nullable=True),
        sa.Column("taken_at", WHEN, nullable=True),
        sa.Column("first_answer_at", WHEN, nullable=True),
        sa.Column("ended_at", WHEN, nullable=True),
        sa.Column("ended_by", sa.String(length=8), nullable=True),
        sa.Column("wait_told_at", WHEN, nullable=True),
        sa.Column("handovers", BIG, nullable=False),
        sa.Column("rating", BIG, nullable=True),
        sa.Column("rated_at", WHEN, nullable=True),
        sa.Column("effort", BIG, nullable=True),
        sa.Column("saved_entry_id", BIG, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reference_conversations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reference_conversations_reader_id"), ["reader_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reference_conversations_staff_id"), ["staff_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reference_conversations_status"), ["status"], unique=False)
    op.create_table(
        "reference_messages",
        sa.Column("id", BIG, nullable=False),
        sa.Column("conversation_id", BIG, nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("side", sa.String(length=8), nullable=False),
        sa.Column("author_id", BIG, nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("file_id", sa.String(length=256), nullable=True),
        sa.Column("file_kind", sa.String(length=16), nullable=True),
        sa.Column("record_id", BIG, nullable=True),
        sa.Column("delivery_id", BIG, nullable=True),
        sa.ForeignKeyConstraint(["conversation_id"], ["reference_conversations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reference_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reference_messages_conversation_id"), ["conversation_id"], unique=False)
    op.create_table(
        "reference_saved_replies",
        sa.Column("id", BIG, nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("added_by", BIG, nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("reference_saved_replies")
    with op.batch_alter_table("reference_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reference_messages_conversation_id"))
    op.drop_table("reference_messages")
    with op.batch_alter_table("reference_conversations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reference_conversations_status"))
        batch_op.drop_index(batch_op.f("ix_reference_conversations_staff_id"))
        batch_op.drop_index(batch_op.f("ix_reference_conversations_reader_id"))
    op.drop_table("reference_conversations")
    op.drop_table("reference_duty")
    op.drop_table("reference_answers")
