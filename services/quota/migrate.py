"""Run the quota migrations: `python -m services.quota.migrate` (the service also runs them
at start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from shared.settings import Settings, asyncpg_url

MIGRATIONS = Path(__file__).parent / "migrations"


def upgrade(database_url: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", asyncpg_url(database_url))
    command.upgrade(config, "head")


if __name__ == "__main__":
    upgrade(Settings.from_env().database_url)
    print("quota migrations: at head")
