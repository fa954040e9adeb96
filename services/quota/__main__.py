"""Entry point: `python -m services.quota` (run several for more throughput or redundancy)."""

from __future__ import annotations

import asyncio
import functools
import os
import sys

from services.quota import log as quota_log
from services.quota import metrics, plans
from services.quota.application import QuotaService
from services.quota.migrate import upgrade
from services.quota.pressure import FleetMonitor
from services.quota.relay import run_relay
from shared import service, subjects
from shared.bus import Bus
from shared.events import ImageDelivered, PromptSubmitted, QuotaDenied, RequestFailed
from shared.settings import Settings

# Prompts decided in one transaction, at most.
PROMPT_BATCH = int(os.environ.get("KILN_QUOTA_BATCH", 256))


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event, *, config: plans.Config) -> None:
    await asyncio.to_thread(upgrade, settings.database_url)
    pool = await quota_log.connect(settings.database_url)
    try:
        fleet = FleetMonitor(config.pressure)
        await fleet.watch(bus.nc)
        metrics.watch_pressure(fleet)
        quota = QuotaService(pool, bus, config, fleet)
        # Users are subject tokens (checked where they enter), so one token is one user.
        await bus.nc.subscribe(subjects.quota_status("*"), queue="quota", cb=quota.answer_status)
        await bus.nc.subscribe(subjects.QUOTA_PRESSURE, queue="quota", cb=quota.answer_pressure)
        await asyncio.gather(
            bus.consume_batches(
                subjects.PROMPTS, "quota", quota.handle_prompts, stop,
                accepts=(PromptSubmitted,), batch=PROMPT_BATCH,
            ),
            bus.consume(
                subjects.OUTCOMES, "quota-refunds", quota.handle_outcome, stop,
                accepts=(QuotaDenied, ImageDelivered, RequestFailed), batch=64,
            ),
            run_relay(pool, bus, stop),
        )
    finally:
        await pool.close()


def main() -> None:
    try:
        config = plans.load()
    except plans.ConfigError as error:
        sys.exit(f"quota: cannot read the plans: {error}")
    service.run("quota", functools.partial(serve, config=config))


if __name__ == "__main__":
    main()
