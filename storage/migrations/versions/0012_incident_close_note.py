"""A reported incident is closed with a note (#20): incidents.close_note.

Revision ID: 0012
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('incidents') as batch:
        batch.add_column(sa.Column('close_note', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('incidents') as batch:
        batch.drop_column('close_note')
