"""Every model of the store, imported in one place so that migrations and ``create_schema`` see them all."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import storage.catalog
import storage.circulation
import storage.ill
import storage.ils_sip2
import storage.incidents
import storage.outbox
import storage.people
import storage.search
import storage.state
import storage.tickets
from storage.db import Base, Database

__all__ = ["Base", "create_schema", "alembic_config"]

MODULES = [
    storage.catalog,
    storage.circulation,
    storage.ill,
    storage.ils_sip2,  # forget_person: card rows only a SIP2 login made
    storage.incidents,
    storage.outbox,
    storage.people,
    storage.search,
    storage.state,
    storage.tickets,
]


def alembic_config(url: str) -> Config:
    """Alembic's configuration for the database at ``url`` (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    return config


async def create_schema(db: Database) -> None:
    """Bring the database's schema up to date (``librarybot db upgrade``)."""
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda sync_conn: _upgrade(sync_conn, db.url))


def _upgrade(connection: object, url: str) -> None:
    config = alembic_config(url)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


# --- Reference desk (#16): the answer base, desk duty, conversations, saved replies ---------------
import storage.reference  # noqa: E402  (its models join the others; forget_person and seed_demo run with them)

MODULES.append(storage.reference)
