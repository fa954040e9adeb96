"""The render queue: paid work before free, and within a tier users in turn.

Jobs wait in the KILN_RENDER_JOBS work-queue stream on `kiln.render.jobs.<tier>.<user>`.
Every (tier, user) with jobs waiting has its own durable pull consumer, shared by all
workers. JetStream still does what makes the queue safe: it hands each job to one worker at
a time, and hands it out again if that worker dies before acking (after `ack_wait`). What
the consumers add is choice: a worker asks the paid users' consumers first, and within a
tier takes one job per user per round, least recently served user first. So one user's
hundred jobs share the fleet with another user's one instead of standing in front of it.

A consumer is created when its subject first holds a job and deleted once it is empty and
nothing of it is in flight. A job published just after the delete simply gets a new one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import subjects
from shared.bus import Bus

log = logging.getLogger("kiln.render.queue")

STREAM = subjects.RENDER_JOBS.name
CLAIM_TIMEOUT_S = 1.0
LEGACY_CONSUMER = "render"  # one consumer for every job (before users took turns)


@dataclass
class Waiting:
    tier: str
    user_id: str
    jobs: int  # not yet handed to any worker
    maybe_due: bool = False  # handed out, not acked: perhaps due again (worth asking for one)
    after_seq: int = 0  # the stream sequence this user's waiting jobs come after

    @property
    def consumer(self) -> str:
        return consumer_name(self.tier, self.user_id)

    @property
    def claimable(self) -> int:
        return self.jobs or int(self.maybe_due)


def consumer_name(tier: str, user_id: str) -> str:
    return f"render-{tier}-{user_id}"


def fair_order(waiting: list[Waiting], last_served: dict[str, float], limit: int) -> list[tuple[Waiting, int]]:
    """The order in which the queue takes the first `limit` jobs: (whose, their n-th job).
    Paid before free; within a tier one job per user per round, the user served longest
    ago (or never) first. Pure."""
    order: list[tuple[Waiting, int]] = []
    for tier in subjects.TIERS:
        users = sorted((w for w in waiting if w.tier == tier and w.claimable > 0),
                       key=lambda w: (last_served.get(w.consumer, 0.0), w.user_id))
        for round_ in range(max((w.claimable for w in users), default=0)):
            for w in users:
                if len(order) >= limit:
                    return order
                if round_ < w.claimable:
                    order.append((w, round_))
    return order


def fair_shares(waiting: list[Waiting], slots: int, last_served: dict[str, float]) -> list[tuple[Waiting, int]]:
    """How many jobs to take from whom for `slots` places, in `fair_order`."""
    counts: dict[str, tuple[Waiting, int]] = {}
    for w, _ in fair_order(waiting, last_served, slots):
        counts[w.consumer] = (w, counts.get(w.consumer, (w, 0))[1] + 1)
    return list(counts.values())


class JobQueue:
    def __init__(self, bus: Bus, *, ack_wait_s: float, max_deliver: int) -> None:
        self.bus = bus
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.last_served: dict[str, float] = {}
        self._consumers: set[str] = set()

    async def prepare(self) -> None:
        """The stream refuses per-user consumers beside one that takes every job."""
        try:
            await self.bus.js.delete_consumer(STREAM, LEGACY_CONSUMER)
        except nats.js.errors.NotFoundError:
            pass

    async def waiting(self) -> list[Waiting]:
        """Who has jobs waiting, and how many each. Creates consumers for new subjects
        and removes those that are done."""
        info = await self.bus.js.stream_info(STREAM, subjects_filter="kiln.render.jobs.>")
        held = set()
        for subject in info.state.subjects or {}:
            _, _, _, tier, user_id = subject.split(".")
            held.add(consumer_name(tier, user_id))
            if consumer_name(tier, user_id) not in self._consumers:
                await self._create(tier, user_id)
        result = []
        for consumer in await self._all_consumers():
            name = consumer.name
            if not name.startswith("render-"):
                continue
            _, tier, user_id = name.split("-", 2)
            if consumer.num_pending or consumer.num_ack_pending:
                # Handed out but not acked: maybe in hand elsewhere, maybe due again (a
                # retry after its back-off, a job of a worker that died): ask for one.
                result.append(Waiting(tier, user_id, consumer.num_pending, maybe_due=bool(consumer.num_ack_pending),
                                      after_seq=consumer.delivered.stream_seq or 0))
            elif name not in held:
                await self._delete(name)
        return result

    async def claim(self, slots: int) -> list[Msg]:
        """Take up to `slots` jobs, in fair order. Each is this worker's until acked (or
        until `ack_wait` passes without a sign of life)."""
        if slots <= 0:
            return []
        claimed: list[Msg] = []
        for waiting, count in fair_shares(await self.waiting(), slots, self.last_served):
            messages = await self._next(waiting.consumer, count)
            if messages:
                self.last_served[waiting.consumer] = time.monotonic()
            claimed += messages
        return claimed

    async def depth(self) -> dict[str, int]:
        """Jobs not yet handed to a worker, per tier."""
        depth = {tier: 0 for tier in subjects.TIERS}
        for consumer in await self._all_consumers():
            if consumer.name.startswith("render-"):
                tier = consumer.name.split("-", 2)[1]
                depth[tier] = depth.get(tier, 0) + consumer.num_pending
        return depth

    # -- JetStream --------------------------------------------------------------------------

    async def _all_consumers(self) -> list:
        consumers, offset = [], 0
        while True:
            page = await self.bus.js.consumers_info(STREAM, offset=offset)
            consumers += page
            if len(page) < 256:  # JetStream's page size
                return consumers
            offset += len(page)

    async def _create(self, tier: str, user_id: str) -> None:
        config = ConsumerConfig(
            durable_name=consumer_name(tier, user_id),
            filter_subject=subjects.render_job(tier, user_id),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
        )
        await self.bus.js.add_consumer(STREAM, config)  # the same config twice is fine
        self._consumers.add(config.durable_name)

    async def _delete(self, name: str) -> None:
        self._consumers.discard(name)
        try:
            await self.bus.js.delete_consumer(STREAM, name)
        except nats.js.errors.NotFoundError:
            pass  # another worker was first

    async def _next(self, consumer: str, count: int) -> list[Msg]:
        """Up to `count` messages that are waiting now; never waits for new ones."""
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        request = json.dumps({"batch": count, "no_wait": True}).encode()
        messages: list[Msg] = []
        try:
            await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{consumer}", request, reply=inbox)
            while len(messages) < count:
                try:
                    msg = await sub.next_msg(timeout=CLAIM_TIMEOUT_S)
                except nats.errors.TimeoutError:
                    break
                if msg.headers and msg.headers.get("Status"):  # 404 no messages, 408 expired
                    break
                messages.append(msg)
        finally:
            await sub.unsubscribe()
        return messages
