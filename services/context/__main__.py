"""Entry point: `python -m services.context`."""

from __future__ import annotations

import asyncio
import sys

from services.context import config as context_config
from services.context.application import Context
from shared import service, subjects
from shared.bus import Bus
from shared.events import QuotaDenied, QuotaGranted
from shared.settings import Settings


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event, *, config: context_config.Config) -> None:
    context = Context(bus, config)
    styles = await bus.nc.subscribe(subjects.CONTEXT_STYLES, queue="context", cb=context.answer_styles)
    try:
        await bus.consume(
            subjects.QUOTA, "context", context.handle_decision, stop, accepts=(QuotaGranted, QuotaDenied)
        )
    finally:
        await styles.unsubscribe()


def main() -> None:
    try:
        config = context_config.load()
    except context_config.ConfigError as error:
        sys.exit(f"context: cannot read its config: {error}")
    service.run("context", lambda settings, bus, stop: serve(settings, bus, stop, config=config))


if __name__ == "__main__":
    main()
