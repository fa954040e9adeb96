"""Alembic environment: runs the quota migrations over asyncpg, then gives the log the
partitions asked for (`migrate.upgrade`), in the same transaction.

An advisory lock serialises migrations, so several quota replicas starting at once do not
race to create the same table."""

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

from services.quota import chain

MIGRATION_LOCK = 0x6B696C6E  # "kiln"


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
        partitions = context.config.attributes.get("partitions")
        if partitions:
            # A new partition's chain starts at the genesis hash; existing ones are kept.
            connection.execute(
                sa.text(
                    "INSERT INTO quota_chain_head (partition, hash)"
                    " SELECT p, :genesis FROM generate_series(0, :n - 1) AS p ON CONFLICT DO NOTHING"
                ),
                {"genesis": chain.GENESIS, "n": partitions},
            )


async def _main() -> None:
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


asyncio.run(_main())
