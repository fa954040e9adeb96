"""Run the quota migrations as the database's owner: `python -m services.quota.migrate`
(`kiln up` and the tests' platform run them before starting the services). The quota
service itself connects as `kiln_quota`, which cannot change the schema: it only checks
at start that the schema is the one it was written for (`schema_problem`)."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from shared.settings import Settings, asyncpg_url

MIGRATIONS = Path(__file__).parent / "migrations"


def _config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", asyncpg_url(database_url))
    return config


def upgrade(database_url: str) -> None:
    command.upgrade(_config(database_url), "head")


async def schema_problem(conn: asyncpg.Connection) -> str | None:
    """Why this code cannot use the database's schema (not migrated, or to another
    revision); None when it is at this code's head."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    try:
        current = await conn.fetchval("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        current = None
    if current == head:
        return None
    return (
        f"the quota log's schema is at revision {current or 'none'}, this quota needs {head}: run "
        "`python -m services.quota.migrate` as the database's owner (`kiln up` does)"
    )


if __name__ == "__main__":
    upgrade(Settings.from_env().database_url)
    print("quota migrations: at head")
