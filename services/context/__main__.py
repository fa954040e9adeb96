"""Entry point: `python -m services.context`."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from services.context.compose import render_request
from shared import service, subjects
from shared.bus import Bus
from shared.events import QuotaDenied, QuotaGranted
from shared.settings import Settings


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event) -> None:
    async def handle_decision(event: QuotaGranted | QuotaDenied, msg: Msg) -> None:
        if isinstance(event, QuotaDenied):
            return  # a denial ends the request at quota; nothing to render
        if await bus.outcome_recorded(event.user_id, event.request_id):
            return  # ended already (given up on while we were behind): render nothing
        job = render_request(event)
        # The job subject is shared by all requests of a tier, so duplicates are caught by
        # message id within the window; past it, render finds the stored image or outcome.
        await bus.publish(
            subjects.render_job(job.tier, job.user_id), job, msg_id=f"{job.user_id}:{job.request_id}:render-requested"
        )

    await bus.consume(
        subjects.QUOTA, "context", handle_decision, stop, accepts=(QuotaGranted, QuotaDenied)
    )


if __name__ == "__main__":
    service.run("context", serve)
