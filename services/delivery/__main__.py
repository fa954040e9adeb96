"""Entry point: `python -m services.delivery` (the event consumer and the HTTP server)."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn
from nats.aio.msg import Msg

from services.delivery.http import create_app
from services.delivery.outcome import outcome
from shared import service, subjects
from shared.bus import Bus
from shared.events import RenderCompleted, RenderFailed
from shared.settings import Settings


class _HttpServer(uvicorn.Server):
    """Signals belong to the service runner (it sets `stop`); uvicorn must not take them."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    async def handle_render_event(event: RenderCompleted | RenderFailed, msg: Msg) -> None:
        subject, result = outcome(event, settings.public_url)
        await bus.publish(subject, result, first_on_subject=True)

    app = create_app(bus, await bus.image_store())
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="warning", lifespan="off"
    )
    http = _HttpServer(config)
    http_task = asyncio.create_task(http.serve())
    try:
        await bus.consume(
            subjects.RENDER_EVENTS, "delivery", handle_render_event, stop,
            accepts=(RenderCompleted, RenderFailed),
        )
    finally:
        http.should_exit = True
        await http_task


if __name__ == "__main__":
    service.run("delivery", serve)
