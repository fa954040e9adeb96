"""Renders started per job, counted across the fleet, so that a job whose worker dies
mid-render every time ends as failed instead of killing workers for ever."""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue

from shared.events import RenderRequested

RENDER_ATTEMPTS = 3  # renders started per job before it fails for good (crashed workers included)


class Attempts:
    """Renders started per request, in a JetStream key-value bucket the fleet shares
    (kiln-render-attempts, keyed `<user>.<request>`). The count goes up before a render
    starts, so a worker that dies mid-render uses up an attempt; a job handed back unstarted
    (drain, heat) does not, unlike JetStream's delivery count."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def start(self, job: RenderRequested, first_delivery: bool = False) -> int:
        """Count a render of `job` starting; return which attempt it is (1, 2, …). On the
        job's first delivery from JetStream no render of it can have started anywhere, so
        the count is written without being read (one round trip less on every job)."""
        key = f"{job.user_id}.{job.request_id}"
        if first_delivery:
            await self.kv.put(key, b"1")
            return 1
        try:
            started = int((await self.kv.get(key)).value or b"0")
        except nats.js.errors.KeyNotFoundError:
            started = 0
        await self.kv.put(key, str(started + 1).encode())
        return started + 1


def out_of_attempts(attempt: int) -> bool:
    """This render would be one more than a job may start."""
    return attempt > RENDER_ATTEMPTS
