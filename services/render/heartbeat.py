"""The worker's heartbeat: once a second, what quota needs to judge fleet pressure.

Queue depth per tier (jobs waiting or in a worker's hands), images/s over the last minute, the
batch limit the thermal guard allows, and the device: GPU temperature, utilisation,
memory and power from NVML on a GPU host, the load average per core on a CPU host.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors

from services.render.metrics import LastHeartbeat
from services.render.status import WorkerStatus
from services.render.thermal import Gpu
from shared import subjects
from shared.bus import Bus
from shared.events import WorkerHeartbeat
from shared.service import sleep_unless_stopped

log = logging.getLogger("kiln.render.heartbeat")

HEARTBEAT_S = 1.0


async def send_heartbeats(
    bus: Bus,
    status: Callable[[], WorkerStatus],
    depth: Callable[[], Awaitable[dict[str, int]]],
    gpu: Gpu,
    stop: asyncio.Event,
) -> None:
    """Every second: the worker's `status()`, the queue's `depth()` per tier, the GPU."""
    while not stop.is_set():
        await _beat(bus, status, depth, gpu)
        await sleep_unless_stopped(stop, HEARTBEAT_S)
    # The last one says it is leaving: the fleet picks another dispatcher now, not once
    # this one's heartbeats are missed.
    await _beat(bus, status, depth, gpu, leaving=True)


async def _beat(
    bus: Bus,
    status: Callable[[], WorkerStatus],
    depth: Callable[[], Awaitable[dict[str, int]]],
    gpu: Gpu,
    leaving: bool = False,
) -> None:
    try:
        queued = await depth()
        now, reading = status(), gpu.read()
        beat = WorkerHeartbeat(
            worker_id=now.worker_id,
            device=now.device,
            model=now.model,
            queue_depth=sum(queued.values()),
            queue_depth_paid=queued.get("paid", 0),
            queue_depth_free=queued.get("free", 0),
            batch_limit=now.batch_limit,
            cpu_load=os.getloadavg()[0] / (os.cpu_count() or 1),
            gpu_temperature_c=now.temperature_c,
            gpu_utilisation=reading.utilisation,
            gpu_memory_used=reading.memory_used,
            gpu_power_w=reading.power_w,
            images_per_s=now.images_per_s,
            rendering=list(now.rendering),
            rendering_since=now.rendering_since,
            step_seconds=now.step_seconds,
            rendering_left_s=round(now.rendering_left_s, 1),
            dispatching=now.dispatching,
            leaving=leaving,
        )
        LastHeartbeat.beat = beat  # what /metrics shows
        await bus.publish_plain(subjects.fleet_telemetry(now.worker_id), beat)
    except (nats.errors.Error, nats.js.errors.Error) as error:
        log.warning("heartbeat not sent: %s", error)
