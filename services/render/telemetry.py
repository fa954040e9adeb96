"""The worker's heartbeat: once a second, what quota needs to judge fleet pressure.

Queue depth per tier (jobs no worker has taken yet), images/s over the last minute, the
batch limit the thermal guard allows, and the device: GPU temperature, utilisation,
memory and power from NVML on a GPU host, the load average per core on a CPU host.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import nats.errors
import nats.js.errors

from typing import TYPE_CHECKING

from services.render.metrics import LastHeartbeat
from services.render.thermal import Gpu
from shared import subjects
from shared.events import WorkerHeartbeat, encode
from shared.service import sleep_unless_stopped

if TYPE_CHECKING:
    from services.render.worker import RenderWorker

log = logging.getLogger("kiln.render.telemetry")

HEARTBEAT_S = 1.0


class Throughput:
    """Images finished in the last minute, as images per second."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._done: list[float] = []

    def add(self) -> None:
        self._done.append(time.monotonic())

    def per_second(self) -> float:
        cutoff = time.monotonic() - self.window_s
        self._done = [at for at in self._done if at >= cutoff]
        return len(self._done) / self.window_s


async def send_heartbeats(worker: RenderWorker, gpu: Gpu, stop: asyncio.Event) -> None:
    bus = worker.bus
    while not stop.is_set():
        try:
            depth = await worker.queue.depth()
            reading = gpu.read()
            beat = WorkerHeartbeat(
                worker_id=worker.worker_id,
                device=worker.renderer.device,
                model=worker.renderer.model,
                queue_depth=sum(depth.values()),
                queue_depth_paid=depth.get("paid", 0),
                queue_depth_free=depth.get("free", 0),
                batch_limit=worker.guard.batch_limit(),
                cpu_load=os.getloadavg()[0] / (os.cpu_count() or 1),
                gpu_temperature_c=worker.guard.temperature(),
                gpu_utilisation=reading.utilisation,
                gpu_memory_used=reading.memory_used,
                gpu_power_w=reading.power_w,
                images_per_s=worker.throughput.per_second(),
            )
            LastHeartbeat.beat = beat  # what /metrics shows
            await bus.nc.publish(subjects.fleet_telemetry(worker.worker_id), encode(beat))
        except (nats.errors.Error, nats.js.errors.Error) as error:
            log.warning("heartbeat not sent: %s", error)
        await sleep_unless_stopped(stop, HEARTBEAT_S)
