"""The render queue as a worker sees it: ask the fleet's dispatcher for jobs.

Jobs wait in the KILN_RENDER_JOBS work-queue stream on `kiln.render.jobs.<tier>.<user>`.
One worker of the fleet dispatches (dispatch.py): it pulls each tier's jobs and hands them
out fairly, paid before free and users in turn. A worker asks it for as many jobs as it has
room for, and acks each job itself once its outcome is published: JetStream still does what
makes the queue safe, handing a job out again if its worker dies before acking.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus
from shared.events import RenderClaim, RenderClaimed, decode_json

log = logging.getLogger("kiln.render.queue")

ANSWER_S = 5.0  # a dispatcher answers at once (or when its wait ends); beyond this it is gone


class JobQueue:
    def __init__(self, bus: Bus, worker_id: str, *, ack_wait_s: float) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.ack_wait_s = ack_wait_s
        self.more = False  # the last claim said more jobs of its batch's kind are waiting

    async def claim(self, slots: int, batch_key: Hashable | None = None, wait_s: float = 0.0) -> list[Msg]:
        """Up to `slots` jobs that can share a batch (of `batch_key`, if given), in fair
        order; with none waiting, wait up to `wait_s` for one. Each is this worker's until
        acked (or until `ack_wait` passes without a sign of life)."""
        self.more = False
        if slots <= 0:
            return []
        claim = RenderClaim(
            worker_id=self.worker_id,
            slots=slots,
            batch_key=list(batch_key) if isinstance(batch_key, tuple) else None,
            wait_ms=int(wait_s * 1000),
        )
        try:
            answer = await self.bus.request(
                subjects.RENDER_CLAIM.pattern, wait_s + ANSWER_S, msgspec.json.encode(claim)
            )
        except nats.errors.NoRespondersError:
            return []  # no dispatcher this moment (one is starting, or taking over)
        except nats.errors.TimeoutError:
            log.warning("the dispatcher did not answer in time; its jobs come back after ack_wait")
            return []
        try:
            claimed = decode_json(answer, RenderClaimed)
        except msgspec.DecodeError as error:
            log.warning("the dispatcher's answer is not one: %s", error)
            return []
        self.more = claimed.more
        return [self.bus.delivered(job.subject, job.reply, job.data, job.headers) for job in claimed.jobs]

    async def depth(self) -> dict[str, int]:
        """Jobs waiting per tier: not yet handed to a worker, or in one's hands unfinished."""
        depth = {}
        for tier in subjects.TIERS:
            try:
                info = await self.bus.consumer_info(subjects.RENDER_JOBS, subjects.render_dispatch_consumer(tier))
            except nats.js.errors.NotFoundError:
                depth[tier] = 0  # no dispatcher has started yet
                continue
            depth[tier] = info.num_pending + info.num_ack_pending
        return depth
