"""Entry point: `python -m services.render [--worker-id ID]`."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket

from services.render import tiny_model
from services.render.pipeline import Renderer
from services.render.telemetry import send_heartbeats
from services.render.worker import RENDER_ATTEMPTS, RenderWorker
from shared import service, subjects
from shared.bus import Bus
from shared.events import RenderRequested
from shared.settings import Settings


def _worker_id() -> str:
    parser = argparse.ArgumentParser(prog="python -m services.render")
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    return parser.parse_args().worker_id


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event, *, worker_id: str) -> None:
    if "KILN_MODEL" not in os.environ:
        # The default model is built on first use; a configured one must already exist.
        await asyncio.to_thread(tiny_model.ensure, settings.model_path)
    renderer = await asyncio.to_thread(Renderer, settings.model_path)
    worker = RenderWorker(bus, await bus.image_store(), renderer, worker_id)
    await asyncio.gather(
        # One job at a time per worker, so waiting jobs go to whichever worker is free.
        bus.consume(
            subjects.RENDER_JOBS, "render", worker.handle_job, stop,
            accepts=(RenderRequested,), max_attempts=RENDER_ATTEMPTS, batch=1, ack_wait_s=60,
        ),
        send_heartbeats(bus, worker_id, renderer.device, settings.model_path.name, worker.throughput, stop),
    )


if __name__ == "__main__":
    service.run("render", functools.partial(serve, worker_id=_worker_id()))
