"""The render queue: paid work before free, and within a tier users in turn.

Jobs wait in the KILN_RENDER_JOBS work-queue stream on `kiln.render.jobs.<tier>.<user>`.
Every (tier, user) with jobs waiting has its own durable pull consumer, shared by all
workers. JetStream still does what makes the queue safe: it hands each job to one worker at
a time, and hands it out again if that worker dies before acking (after `ack_wait`). What
the consumers add is choice: a worker asks the paid users' consumers first, and within a
tier takes one job per user per round, least recently served user first. So one user's
hundred jobs share the fleet with another user's one instead of standing in front of it.

A consumer is created when its subject first holds a job, and deleted once it has been idle
for longer than `ack_wait`. A job published just after the delete simply gets a new one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from shared import subjects
from shared.bus import Bus
from shared.events import ID_PATTERN

log = logging.getLogger("kiln.render.queue")

MAX_CONSUMERS_REACHED = 10026  # JetStream's error code
NO_ROOM_PAUSE_S = 5.0
MAX_DISCARDED = 100  # junk jobs kept as dead letters per subject; the rest are only removed


@dataclass
class Waiting:
    tier: str
    user_id: str
    jobs: int  # not yet handed to any worker
    maybe_due: bool = False  # handed out, not acked: perhaps due again (a retry, a dead worker's)
    after_seq: int = 0  # the stream sequence this user's waiting jobs come after

    @property
    def consumer(self) -> str:
        return consumer_name(self.tier, self.user_id)


consumer_name = subjects.render_consumer


def fair_order(waiting: list[Waiting], last_served: dict[str, float], limit: int) -> list[tuple[Waiting, int]]:
    """The order in which the queue takes the first `limit` waiting jobs: (whose, their
    n-th job). Paid before free; within a tier one job per user per round, the user served
    longest ago (or never) first. Pure."""
    order: list[tuple[Waiting, int]] = []
    for tier in subjects.TIERS:
        users = sorted(
            (w for w in waiting if w.tier == tier and w.jobs > 0),
            key=lambda w: (last_served.get(w.consumer, 0.0), w.user_id),
        )
        for round_ in range(max((w.jobs for w in users), default=0)):
            for w in users:
                if len(order) >= limit:
                    return order
                if round_ < w.jobs:
                    order.append((w, round_))
    return order


def fair_shares(waiting: list[Waiting], slots: int, last_served: dict[str, float]) -> list[tuple[Waiting, int]]:
    """How many jobs to ask whom for, for `slots` places: jobs waiting in `fair_order`
    first; slots left over ask users whose jobs are all handed out whether one is due
    again (a retry after its back-off, a job of a worker that died)."""
    counts: dict[str, tuple[Waiting, int]] = {}
    for w, _ in fair_order(waiting, last_served, slots):
        counts[w.consumer] = (w, counts.get(w.consumer, (w, 0))[1] + 1)
    left = slots - sum(count for _, count in counts.values())
    maybe = sorted(
        (w for w in waiting if w.maybe_due and w.consumer not in counts),
        key=lambda w: (w.tier != "paid", last_served.get(w.consumer, 0.0), w.user_id),
    )
    return [*counts.values(), *((w, 1) for w in maybe[: max(0, left)])]


class JobQueue:
    def __init__(self, bus: Bus, *, ack_wait_s: float, max_deliver: int) -> None:
        self.bus = bus
        self.ack_wait_s = ack_wait_s
        self.max_deliver = max_deliver
        self.last_served: dict[str, float] = {}  # consumer → when this worker last took a job
        self._empty_since: dict[str, float] = {}  # consumer → when this worker first saw it idle
        self._no_room_until = 0.0  # the stream refused a consumer: ask again after this

    async def waiting(self) -> list[Waiting]:
        """Who has jobs waiting, and how many each. Creates a consumer for a user with jobs
        and none yet; removes one that has been idle for longer than `ack_wait`."""
        consumers = {c.name: c for c in await self._all_consumers()}
        counts = await self.bus.subject_counts(subjects.RENDER_JOBS, subjects.RENDER_JOB.pattern)
        result, with_jobs, now = [], set(), time.monotonic()
        for subject, count in counts.items():
            tier, user_id = subject.split(".")[3:5]
            if tier not in subjects.TIERS or not ID_PATTERN.match(user_id):
                await self._discard(subject)  # no valid job is ever published there
                continue
            with_jobs.add(consumer_name(tier, user_id))
            if consumer_name(tier, user_id) not in consumers and await self._create(tier, user_id):
                result.append(Waiting(tier, user_id, count))
        for name, consumer in consumers.items():
            _, tier, user_id = name.split("-", 2)
            if consumer.num_pending or consumer.num_ack_pending:
                self._empty_since.pop(name, None)
                result.append(
                    Waiting(
                        tier,
                        user_id,
                        consumer.num_pending,
                        maybe_due=bool(consumer.num_ack_pending),
                        after_seq=consumer.delivered.stream_seq or 0,
                    )
                )
            elif name not in with_jobs and now - self._empty_since.setdefault(name, now) > self.ack_wait_s:
                # Idle this long: no job of it can be in anyone's hands.
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
            tier = consumer.name.split("-", 2)[1]
            depth[tier] = depth.get(tier, 0) + consumer.num_pending
        return depth

    # -- JetStream --------------------------------------------------------------------------

    async def _all_consumers(self) -> list[ConsumerInfo]:
        """The queue's per-user consumers."""
        consumers = await self.bus.consumers(subjects.RENDER_JOBS)
        return [c for c in consumers if c.name.startswith(subjects.RENDER_CONSUMER_PREFIX)]

    async def _discard(self, subject: str) -> None:
        """Jobs on a subject whose tokens cannot name a consumer (a `/`, 300 characters, an
        unknown tier): only a client bypassing context publishes there. They go to the dead
        letters, and the subject is emptied, so that they cannot wedge the queue."""
        seq = 1
        for _ in range(MAX_DISCARDED):
            stored = await self.bus.next_stored(subjects.RENDER_JOBS, subject, seq)
            if stored is None:
                break
            await self.bus.dead_letter_stored(subjects.RENDER_JOBS.name, stored, "not a render job subject")
            seq = stored.seq + 1
        await self.bus.purge_subject(subjects.RENDER_JOBS, subject)

    async def _create(self, tier: str, user_id: str) -> bool:
        """A consumer for the user's jobs; False if the stream has no room for one now
        (its jobs wait until an idle consumer is removed; the others are served). After a
        refusal, no new consumer is asked for until NO_ROOM_PAUSE_S have passed."""
        if time.monotonic() < self._no_room_until:
            return False
        config = ConsumerConfig(
            durable_name=consumer_name(tier, user_id),
            filter_subject=subjects.render_job(tier, user_id),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
        )
        try:
            await self.bus.add_consumer(subjects.RENDER_JOBS, config)  # two workers creating it at once is fine
        except nats.js.errors.BadRequestError as error:
            if error.err_code != MAX_CONSUMERS_REACHED:
                raise
            log.warning(
                "the render queue has no room for more users' consumers (%s); new users wait", error.description
            )
            self._no_room_until = time.monotonic() + NO_ROOM_PAUSE_S
            return False
        return True

    async def _delete(self, name: str) -> None:
        self._empty_since.pop(name, None)
        await self.bus.delete_consumer(subjects.RENDER_JOBS, name)  # (another worker may have been first)

    async def _next(self, consumer: str, count: int) -> list[Msg]:
        """Up to `count` messages that are waiting now; never waits for new ones."""
        return await self.bus.pull_now(subjects.RENDER_JOBS, consumer, count)
