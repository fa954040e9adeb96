"""Entry point: `python -m services.delivery` (the event consumer and the HTTP server)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import uvicorn
from opentelemetry import metrics
from nats.aio.msg import Msg

from services.delivery.http import Site, create_app
from services.delivery.links import Links, Signer, load_secret
from services.delivery.outcome import outcome
from services.delivery.image_records import ImageRecord, ImageRecords
from shared import service, subjects
from shared.bus import Bus
from shared.events import RenderCompleted, RenderFailed
from shared.settings import Settings
from shared.subjects import IMAGE_META_BUCKET

DOWNLOAD_TTL_S = int(os.environ.get("KILN_LINK_TTL_S", 24 * 3600))
SHARE_TTL_S = int(os.environ.get("KILN_SHARE_TTL_S", 7 * 24 * 3600))


outcomes = metrics.get_meter("kiln.delivery").create_counter(
    "kiln_delivery_outcomes", description="Render results turned into outcomes: delivered or failed"
)


class _HttpServer(uvicorn.Server):
    """Signals belong to the service runner (it sets `stop`); uvicorn must not take them."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    links = Links(Signer(load_secret(settings.data_dir)), settings.public_url, DOWNLOAD_TTL_S, SHARE_TTL_S)
    records = await ImageRecords.open(bus.js)

    async def handle_render_event(event: RenderCompleted | RenderFailed, msg: Msg) -> None:
        if isinstance(event, RenderCompleted):
            # Kept before the outcome goes out, so every delivered image has its record.
            with bus.tracer.start_as_current_span("delivery record image", attributes={"kiln.bucket": IMAGE_META_BUCKET}):
                await records.put(ImageRecord(
                    user_id=event.user_id, request_id=event.request_id, conversation_id=event.conversation_id,
                    prompt=event.prompt, composition=event.composition, width=event.width, height=event.height,
                    created_at=event.completed_at,
                ))
        subject, result = outcome(event, links, time.time())
        if await bus.publish(subject, result, first_on_subject=True):
            outcomes.add(1, {"outcome": "delivered" if isinstance(event, RenderCompleted) else "failed"})

    app = create_app(Site(bus, await bus.image_store(), records, links, settings))
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
