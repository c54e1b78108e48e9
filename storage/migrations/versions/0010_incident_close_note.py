"""A reported incident is closed with a note (#20): incidents.close_note.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('incidents') as batch:
        batch.add_column(sa.Column('close_note', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('incidents') as batch:
        batch.drop_column('close_note')
