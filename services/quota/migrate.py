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


def _config(database_url: str | None = None, partitions: int | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", asyncpg_url(database_url))
    if partitions is not None:
        config.attributes["partitions"] = partitions  # read by migrations/env.py
    return config


def upgrade(database_url: str, partitions: int | None = None) -> None:
    """Bring the schema to head and the log to at least `partitions` partitions
    (default: KILN_QUOTA_PARTITIONS). Partitions are never removed: a user's partition
    is a hash modulo their number, and events already written stay where they are."""
    wanted = Settings.from_env().quota_partitions if partitions is None else partitions
    command.upgrade(_config(database_url, wanted), "head")


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
    settings = Settings.from_env()
    upgrade(settings.database_url)
    print(f"quota migrations: at head, at least {settings.quota_partitions} partitions")
