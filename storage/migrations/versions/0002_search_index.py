"""Catalog search index: FTS5 over the records' token strings on SQLite, GIN indexes on PostgreSQL.

The tables and columns come from the models (revision 0001); what models cannot express is made by
``storage.search.create_search_index``.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

from storage.search import create_search_index, drop_search_index

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_search_index(op.get_bind())


def downgrade() -> None:
    drop_search_index(op.get_bind())
