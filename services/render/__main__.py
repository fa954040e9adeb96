"""Entry point: `python -m services.render [--worker-id ID] [--gpu N]`.

One worker process per GPU: `--gpu N` pins it to GPU N (CUDA_VISIBLE_DEVICES). Settings:
KILN_MODEL (a local diffusers folder; Kiln's own model by default), KILN_RENDER_MAX_BATCH
(16), KILN_RENDER_MAX_WAIT_MS (50), KILN_RENDER_ACK_WAIT_S (30), and the thermal guard's
KILN_GPU_HOT_C (80), KILN_GPU_PAUSE_C (87), KILN_GPU_RESUME_C (75).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket

from services.render.positions import QueueReporter
from services.render.queue import JobQueue
from services.render.telemetry import send_heartbeats
from services.render.thermal import Gpu, ThermalGuard, injected_temperature
from services.render.worker import MAX_DELIVERIES, Attempts, RenderWorker
from shared import service
from shared.bus import GIVE_UP_MARGIN, Bus
from shared.settings import Settings


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.render")
    parser.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--gpu", type=int, help="render on this GPU only (sets CUDA_VISIBLE_DEVICES)")
    arguments = parser.parse_args()
    if arguments.gpu is not None:  # before torch initialises CUDA
        # PCI order: the numbering NVML (the thermal guard) uses too.
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(arguments.gpu)
    return arguments


async def serve(settings: Settings, bus: Bus, stop: asyncio.Event, *, worker_id: str) -> None:
    from services.render.pipeline import Renderer  # imports torch: after CUDA_VISIBLE_DEVICES

    env = os.environ
    max_batch = int(env.get("KILN_RENDER_MAX_BATCH", 16))
    renderer = await asyncio.to_thread(Renderer, settings.model_path)
    gpu = Gpu()

    def temperature() -> float | None:
        injected = injected_temperature()
        return injected if injected is not None else gpu.read().temperature_c

    guard = ThermalGuard(
        temperature, max_batch, hot_c=float(env.get("KILN_GPU_HOT_C", 80)),
        pause_c=float(env.get("KILN_GPU_PAUSE_C", 87)), resume_c=float(env.get("KILN_GPU_RESUME_C", 75)),
    )
    queue = JobQueue(
        bus, ack_wait_s=float(env.get("KILN_RENDER_ACK_WAIT_S", 30)), max_deliver=MAX_DELIVERIES + GIVE_UP_MARGIN
    )
    worker = RenderWorker(
        bus, await bus.image_store(), renderer, worker_id, queue, guard, await Attempts.open(bus),
        max_wait_s=float(env.get("KILN_RENDER_MAX_WAIT_MS", 50)) / 1000,
    )
    reporter = QueueReporter(bus, queue, worker_id)
    await asyncio.gather(worker.run(stop), send_heartbeats(worker, gpu, stop), reporter.run(stop))


if __name__ == "__main__":
    service.run("render", functools.partial(serve, worker_id=_arguments().worker_id))
