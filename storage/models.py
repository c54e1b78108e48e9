"""Every model of the store, imported in one place so that migrations and ``create_schema`` see them all."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import storage.catalog
import storage.circulation
import storage.events
import storage.ill
import storage.ill_exchange
import storage.ils_sip2
import storage.incidents
import storage.outbox
import storage.people
import storage.quality
import storage.reference
import storage.search
import storage.staffchat
import storage.state
import storage.surveys
import storage.tickets
from storage.db import Base, Database

__all__ = ["Base", "create_schema", "alembic_config"]

MODULES = [
    storage.catalog,
    storage.circulation,
    storage.events,  # events and programmes (#17)
    storage.ill,
    storage.ill_exchange,  # partner libraries over ISO 18626 (#22)
    storage.ils_sip2,  # forget_person: card rows only a SIP2 login made
    storage.incidents,
    storage.outbox,
    storage.people,
    storage.reference,  # the reference desk (#16)
    storage.search,
    storage.staffchat,  # the staff group's current id and availability (#14)
    storage.state,
    storage.tickets,
    # service quality (#18): surveys (models, forget_person, demo) and per-staff ratings (demo ratings)
    storage.surveys,
    storage.quality,
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
