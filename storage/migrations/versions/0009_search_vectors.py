"""Catalog search on PostgreSQL from stored tsvectors (#21): two generated columns hold each record's
title and whole-record vectors, and the GIN indexes are built on them instead of on expressions.

With expression indexes, every row a query rechecks (a very common word, a lossy bitmap) and every
row the planner filters on its way down the candidate order recomputes its vector from the token
strings; a stored vector is read, not rebuilt. Nothing changes on SQLite (FTS5 stores its own index).
The columns are made here, in SQL, and are not part of the models (writes never name them).

Revision ID: 0009
Revises: 0008
"""

from alembic import op

from storage.search import create_search_vectors, drop_search_vectors

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_search_vectors(op.get_bind())


def downgrade() -> None:
    drop_search_vectors(op.get_bind())
