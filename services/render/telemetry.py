"""The worker's heartbeat: once a second, what quota needs to judge fleet pressure.

On a CPU host the load figure is the 1-minute load average per core; GPU figures (NVML)
join it when the worker runs on a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import nats.errors
import nats.js.errors

from shared import subjects
from shared.bus import Bus
from shared.events import WorkerHeartbeat, encode

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


async def queue_depth(bus: Bus) -> int:
    """Jobs waiting in the render queue (all tiers), as JetStream counts them."""
    info = await bus.js.consumer_info(subjects.RENDER_JOBS.name, "render")
    return info.num_pending


async def send_heartbeats(
    bus: Bus, worker_id: str, device: str, model: str, throughput: Throughput, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            beat = WorkerHeartbeat(
                worker_id=worker_id,
                device=device,
                model=model,
                queue_depth=await queue_depth(bus),
                cpu_load=os.getloadavg()[0] / (os.cpu_count() or 1),
                images_per_s=throughput.per_second(),
            )
            await bus.nc.publish(subjects.fleet_telemetry(worker_id), encode(beat))
        except (nats.errors.Error, nats.js.errors.Error) as error:
            log.warning("heartbeat not sent: %s", error)
        try:
            await asyncio.wait_for(stop.wait(), HEARTBEAT_S)
        except TimeoutError:
            pass
