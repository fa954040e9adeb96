"""Intake: claim jobs from the fleet's dispatcher (queue.py), hold them, form a batch of
compatible ones, and hand back what was claimed but not started (draining, too hot)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg

from services.render.pipeline import batch_key
from services.render.queue import JobQueue
from shared import consuming, subjects
from shared.bus import Bus
from shared.consuming import Received
from shared.events import RenderRequested
from shared.service import sleep_unless_stopped

log = logging.getLogger("kiln.render")

# Deliveries per job, hand-backs (drain, heat) included, before the bus gives up on it.
MAX_DELIVERIES = 13
IDLE_POLL_S = 1.0  # with nothing in hand, wait this long at the dispatcher for a job
FILL_RETRY_S = 0.005  # a batch filling asks the dispatcher again this soon
NO_DISPATCHER_RETRY_S = 0.1


def form_batch(held: list[Received], limit: int) -> tuple[list[Received], list[Received]]:
    """Up to `limit` held jobs of the oldest held job's kind (in the order held), and the
    rest."""
    if not held:
        return [], []
    key = batch_key(held[0].event)
    group = [item for item in held if batch_key(item.event) == key][:limit]
    return group, [item for item in held if item not in group]


def batch_ready(size: int, limit: int, waited_s: float, max_wait_s: float, more_queued: bool) -> bool:
    """A forming batch goes once it is full, once its oldest job has waited `max_wait_s`
    for company, or once the dispatcher holds no more of its kind."""
    return size >= limit or waited_s >= max_wait_s or not more_queued


class Intake:
    def __init__(self, bus: Bus, queue: JobQueue, max_wait_s: float) -> None:
        self.bus = bus
        self.queue = queue
        self.max_wait_s = max_wait_s
        self.held: list[Received] = []  # claimed, not yet in a batch; at most one batch's worth

    async def next_batch(self, limit: int, stop: asyncio.Event, idle: Callable[[], Awaitable[None]]) -> list[Received]:
        """Up to `limit` compatible jobs: as soon as that many are here, once the dispatcher
        holds no more of their kind (an idle fleet does not wait for company that will not
        come), or once the oldest has waited `max_wait_s` for company. With nothing held,
        `idle` runs first (the last batch's stores and reports)."""
        first_at: float | None = None
        while not stop.is_set():
            room = limit - len(self.held)  # never hold more than one batch's worth
            more_queued = False
            if room > 0 and self.held:
                await self.take(await self.queue.claim(room, batch_key(self.held[0].event)))
                more_queued = self.queue.more  # more of its kind wait: the batch may fill
            if not self.held:
                first_at = None
                await idle()  # nothing to render meanwhile
                asked = time.monotonic()
                await self.take(await self.queue.claim(limit, wait_s=IDLE_POLL_S))  # waits for a job
                more_queued = self.queue.more
                if not self.held:
                    if time.monotonic() - asked < IDLE_POLL_S / 2:  # no dispatcher (yet): one starts within seconds
                        await sleep_unless_stopped(stop, NO_DISPATCHER_RETRY_S)
                    continue
            first_at = first_at or time.monotonic()
            group, rest = form_batch(self.held, limit)
            if batch_ready(len(group), limit, time.monotonic() - first_at, self.max_wait_s, more_queued):
                self.held = rest
                return group
            await asyncio.sleep(FILL_RETRY_S)  # another worker took them first; ask again
        return []

    async def take(self, claimed: list[Msg]) -> None:
        """Hold the claimed jobs that are jobs (junk goes to the dead letters)."""
        self.held += await consuming.checked(
            self.bus, claimed, subjects.RENDER_JOBS, (RenderRequested,), MAX_DELIVERIES
        )

    async def hand_back(self) -> None:
        """Draining or too hot: jobs claimed but not started go back to the queue at once."""
        for item in self.held:
            try:
                await item.msg.nak()
            except nats.errors.Error:
                pass  # JetStream redelivers it after ack_wait anyway
        if self.held:
            log.info("handed back %d jobs", len(self.held))
        self.held = []
