"""Entry point: `python -m services.quota`."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import create_async_engine

from services.quota.application import QuotaService
from services.quota.migrate import upgrade
from shared import service, subjects
from shared.bus import Bus
from shared.events import PromptSubmitted
from shared.settings import Settings, asyncpg_url


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    await asyncio.to_thread(upgrade, settings.database_url)
    # pre_ping: after a database restart, a pooled connection is tested before use.
    engine = create_async_engine(asyncpg_url(settings.database_url), pool_size=10, pool_pre_ping=True)
    try:
        quota = QuotaService(engine, bus)
        await bus.consume(subjects.PROMPTS, "quota", quota.handle_prompt, stop, accepts=(PromptSubmitted,))
    finally:
        await engine.dispose()


if __name__ == "__main__":
    service.run("quota", serve)
