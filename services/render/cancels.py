"""Cancels: which jobs their users asked to drop, by (user, request).

A cancel is heard on plain NATS (`kiln.render.cancel.<user>.<request>`, see application.py)
and kept in the KILN_RENDER_CANCELS stream, so a worker that claims the job later still sees
it. The set heard here is what the render thread checks between steps; it is bounded, as a
worker hears every cancel of the fleet for as long as it lives. A cancel evicted from it is
still found in the stream before its job renders; only a job already rendering when its
cancel is that old would miss it.
"""

from __future__ import annotations

from collections import OrderedDict

from shared import subjects
from shared.bus import Bus
from shared.events import RenderRequested

MAX_CANCELS = 100_000  # cancels remembered (oldest heard forgotten first); ~10 MB at most

JobKey = tuple[str, str]  # (user, request): a request id is unique only per user


def job_key(job: RenderRequested) -> JobKey:
    return (job.user_id, job.request_id)


class Cancels:
    """The (user, request) keys heard on the cancel subject, the oldest evicted past
    `limit`. `in` is read from the render thread and never changes the order (a dict
    lookup); only the event loop adds."""

    # An OrderedDict rather than a cache library: all it needs is insertion order and
    # popitem(last=False), and the render thread's lookups must not reorder it.

    def __init__(self, bus: Bus, limit: int = MAX_CANCELS) -> None:
        self.bus = bus
        self.limit = limit
        self._heard: OrderedDict[JobKey, None] = OrderedDict()

    def add(self, user_id: str, request_id: str) -> None:
        key = (user_id, request_id)
        self._heard[key] = None
        self._heard.move_to_end(key)  # heard again: the newest
        while len(self._heard) > self.limit:
            self._heard.popitem(last=False)

    def __contains__(self, job: RenderRequested) -> bool:
        return job_key(job) in self._heard

    def __len__(self) -> int:
        return len(self._heard)

    async def is_cancelled(self, job: RenderRequested) -> bool:
        """Heard here, or kept in the cancel stream (heard before this worker started, or
        by another worker)."""
        if job in self:
            return True
        cancel = subjects.render_cancel(job.user_id, job.request_id)
        return await self.bus.last_message(subjects.RENDER_CANCELS, cancel) is not None
