"""`kiln status`: a live view of the render fleet from the workers' heartbeats.

One row per worker heard in the last few seconds (device, temperature, utilisation, memory,
power or CPU load, batch limit, images/s), and under it the queue per tier, the fleet
pressure quota sheds load by, and the fleet's images/s.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kiln.client import KilnClient, ServiceUnavailable
from shared import subjects
from shared.bus import Message
from shared.events import WorkerHeartbeat, as_utc, decode_json

STALE_S = 5.0  # a worker not heard from for this long is gone from the view
REFRESH_S = 1.0


class Fleet:
    def __init__(self) -> None:
        self.workers: dict[str, tuple[float, WorkerHeartbeat]] = {}
        self.pressure: dict[str, str] = {}

    def heard(self, beat: WorkerHeartbeat) -> None:
        self.workers[beat.worker_id] = (time.monotonic(), beat)

    def live(self) -> list[WorkerHeartbeat]:
        cutoff = time.monotonic() - STALE_S
        return [beat for at, beat in sorted(self.workers.values(), key=lambda w: w[1].worker_id) if at >= cutoff]

    def view(self) -> Group:
        table = Table(title="Kiln render fleet", title_justify="left")
        columns = ("worker", "device", "model", "temp °C", "util", "memory", "power", "cpu load", "batch", "img/s")
        for column in (*columns, "rendering now"):
            table.add_column(
                column, justify="left" if column in ("worker", "device", "model", "rendering now") else "right"
            )
        beats = self.live()
        for b in beats:
            table.add_row(
                b.worker_id,
                b.device,
                b.model,
                _num(b.gpu_temperature_c, "{:.0f}"),
                _num(b.gpu_utilisation, "{:.0%}"),
                _num(b.gpu_memory_used, "{:.0%}"),
                _num(b.gpu_power_w, "{:.0f} W"),
                f"{b.cpu_load:.2f}",
                "paused" if b.batch_limit == 0 else str(b.batch_limit),
                f"{b.images_per_s:.2f}",
                _rendering(b),
            )
        # Every worker sees the same queue; the newest report is the best.
        newest = max(beats, key=lambda b: b.at, default=None)
        queue = (
            f"queue: paid {newest.queue_depth_paid}, free {newest.queue_depth_free}"
            if newest
            else "queue: no worker reporting"
        )
        level = self.pressure.get("level", "unknown")
        colour = {"normal": "green", "elevated": "yellow", "critical": "red"}.get(level, "white")
        summary = Text.assemble(
            (f"{len(beats)} worker{'' if len(beats) == 1 else 's'} · ", ""),
            (queue, ""),
            ("  ·  pressure: ", ""),
            (level, f"bold {colour}"),
            (f" ({self.pressure['why']})" if "why" in self.pressure else "", ""),
            (_shed(self.pressure), ""),
            (f"  ·  {sum(b.images_per_s for b in beats):.2f} images/s", ""),
        )
        return Group(table, summary)


def _shed(pressure: dict[str, str]) -> str:
    """What quota shed lately: free requests denied under pressure, images degraded."""
    if "shed_10m" not in pressure:
        return ""
    return f"  ·  last 10 min: {pressure['shed_10m']} shed, {pressure['degraded_10m']} degraded"


def _rendering(beat: WorkerHeartbeat) -> str:
    """The batch in the pipeline: its age and its jobs (the first few), or "idle"."""
    if not beat.rendering or beat.rendering_since is None:
        return "idle"
    age_s = max(0.0, (beat.at - as_utc(beat.rendering_since)).total_seconds())
    jobs = ", ".join(beat.rendering[:3]) + (f" +{len(beat.rendering) - 3}" if len(beat.rendering) > 3 else "")
    return f"{len(beat.rendering)} for {age_s:.0f} s: {jobs}"


def _num(value: float | None, form: str) -> str:
    return "–" if value is None else form.format(value)


async def show(client: KilnClient, once: bool, listen_s: float = 2.5) -> Group:
    """Follow the fleet: refreshed every second until Ctrl-C, or one view after
    `listen_s` seconds of listening (`once`), which is returned."""
    fleet = Fleet()

    async def on_beat(message: Message) -> None:
        try:
            fleet.heard(decode_json(message.data, WorkerHeartbeat))
        except msgspec.DecodeError:
            pass  # not a heartbeat we can read: not ours to show

    subscription = await client.bus.listen(subjects.FLEET_TELEMETRY.pattern, on_beat)
    try:
        if once:
            await asyncio.sleep(listen_s)
            await _ask_pressure(client, fleet)
            return fleet.view()
        with Live(fleet.view(), refresh_per_second=2, transient=False) as live:
            while True:
                await _ask_pressure(client, fleet)
                live.update(fleet.view())
                await asyncio.sleep(REFRESH_S)
    finally:
        await subscription.unsubscribe()


async def _ask_pressure(client: KilnClient, fleet: Fleet) -> None:
    try:
        fleet.pressure = await client.pressure(timeout_s=1)
    except (ServiceUnavailable, nats.errors.Error) as error:
        fleet.pressure = {"level": "unknown", "why": str(error)}
