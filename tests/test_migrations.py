"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from storage.db import Database
from storage.models import Base


def _search_index_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """The catalog search index (FTS5 tables, expression indexes) is made by revision 0002 in SQL
    that models cannot express; everything else must match the models."""
    if type_ == "table" and name is not None and name.startswith("records_fts"):
        return False
    if type_ == "index" and reflected and compare_to is None and (name or "").startswith("ix_records_search_"):
        return False
    if type_ == "column" and reflected and compare_to is None and name in ("search_vector", "search_title_vector"):
        return False  # PostgreSQL's stored search vectors (revision 0009)
    return True


async def test_upgraded_schema_matches_the_models(db: Database) -> None:
    def differences(connection: Any) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"include_object": _search_index_object, "compare_type": False}
        )
        return compare_metadata(context, Base.metadata)

    async with db.engine.connect() as conn:
        diff = await conn.run_sync(differences)
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert diff == []
    assert set(Base.metadata.tables) <= tables
