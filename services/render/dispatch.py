"""The dispatcher: one worker of the fleet holds the head of the render queue and hands its
jobs to the workers that ask, paid before free and users in turn.

events in   RenderRequested  pulled from KILN_RENDER_JOBS, one durable consumer per tier
            RenderClaim      (kiln.render.claim, request/reply) from a worker with room
decide      fair.py: who is next; a claim gets jobs that can share one batch
events out  RenderClaimed    the jobs as JetStream delivered them: the worker acks each
            RenderProgress   (state "queued") the place of the first held jobs, once a second
storage     none: a job stays in JetStream until a worker acks it

Why one dispatcher: fairness needs someone who sees the waiting users side by side. A
consumer per user (Kiln's first queue) made every claim read the whole subject map and made
the server keep a consumer, a Raft group and a directory per waiting user. Here the server
keeps two consumers whatever the crowd, and a claim is one request.

It holds at most `window` jobs per tier (the consumers' max_ack_pending) and tells
JetStream now and then that they are still in hand. A worker that dies holding jobs: they
come back to the dispatcher after `ack_wait`. The dispatcher dies: the jobs it held come
back after `ack_wait` to the next one (fleet.py says who), and the jobs at workers never
noticed. A dispatcher that steps down (it is stopping, or a second one appeared) gives back
what it holds at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.render import positions
from services.render.fair import FairQueue
from services.render.fleet import Fleet
from services.render.pipeline import batch_key
from shared import consuming, subjects
from shared.bus import Bus
from shared.events import ClaimedJob, RenderClaim, RenderClaimed, RenderRequested, decode_json
from shared.service import sleep_unless_stopped

log = logging.getLogger("kiln.render.dispatch")

PULL_EXPIRES_S = 1.0  # a standing pull lasts this long; then the next asks for what fits now
PULL_BATCH = 512  # jobs asked for per pull, at most
REPORT_S = 1.0  # queue places, once a second
CHECK_S = 0.5  # how often a worker that does not dispatch asks whether it should


@dataclass
class Held:
    msg: Msg
    job: RenderRequested


class Dispatcher:
    def __init__(
        self,
        bus: Bus,
        fleet: Fleet,
        *,
        ack_wait_s: float,
        max_deliver: int,
        max_attempts: int,
        window: int,
        shares: dict[str, int],
    ) -> None:
        self.bus = bus
        self.fleet = fleet
        self.ack_wait_s = ack_wait_s
        self.max_deliver, self.max_attempts = max_deliver, max_attempts
        self.window = window
        self.shares = shares
        self.jobs: FairQueue[Held] = FairQueue(lambda held: batch_key(held.job))
        self.dispatching = False
        self._asked: dict[str, tuple[int, float]] = {}  # tier → (jobs the standing pull may still bring, until)
        self._arrived = asyncio.Event()  # replaced after each arrival: claims waiting for a job wake up
        self._pull_ended = asyncio.Event()  # a standing pull has brought all it asked for, or expired

    async def run(self, stop: asyncio.Event) -> None:
        self.fleet.nobody_answered = not await self._someone_dispatches()
        while not stop.is_set():
            if self.fleet.should_dispatch(self.dispatching):
                try:
                    await self._dispatch(stop)
                except nats.errors.Error as error:  # (nats.js.errors too)
                    log.warning("dispatching stopped by a bus error, starting again: %s", error)
            await sleep_unless_stopped(stop, CHECK_S)

    async def _someone_dispatches(self) -> bool:
        """Ask for no jobs: does any dispatcher answer?"""
        claim = msgspec.json.encode(RenderClaim(worker_id=self.fleet.worker_id, slots=0))
        try:
            await self.bus.request(subjects.RENDER_CLAIM.pattern, CHECK_S, claim)
        except nats.errors.NoRespondersError:
            return False
        except nats.errors.Error:
            pass  # (a timeout: one may be there, busy) listen for its heartbeat
        return True

    async def _dispatch(self, stop: asyncio.Event) -> None:
        """Be the fleet's dispatcher until stopped or another should be."""
        await self._prepare_consumers()
        inboxes = {tier: await self.bus.inbox(self._arrival_handler(tier)) for tier in subjects.TIERS}
        claims = await self.bus.serve(subjects.RENDER_CLAIM.pattern, self._answer, queue="dispatch")
        self.dispatching = True
        log.info("dispatching the render queue")
        extend_s = min(10.0, self.ack_wait_s / 3)
        extended = reported = time.monotonic()
        try:
            while not stop.is_set() and self.fleet.should_dispatch(True):
                for tier, (inbox, _) in inboxes.items():
                    await self._pull(tier, inbox)
                now = time.monotonic()
                if now - extended >= extend_s:
                    await self._extend()
                    extended = now
                if now - reported >= REPORT_S:
                    order = [held.job for held in self.jobs.order(positions.MAX_REPORTED)]
                    await positions.report_places(self.bus, order, self.fleet.live())
                    reported = now
                self._pull_ended.clear()
                await _wait(self._pull_ended, 0.1)
        finally:
            self.dispatching = False
            await claims.unsubscribe()
            await self._give_back()
            # A standing pull may still bring jobs: they are given back as they come.
            await asyncio.sleep(PULL_EXPIRES_S + 0.2)
            for _, subscription in inboxes.values():
                await subscription.unsubscribe()
            log.info("no longer dispatching the render queue")

    # -- JetStream: the consumers, pulling, keeping held jobs -------------------------------

    async def _prepare_consumers(self) -> None:
        """One consumer per tier, with this dispatcher's ack_wait and window. The consumers
        per user of Kiln's first queue go first: a work queue's consumers may not overlap."""
        ours = {subjects.render_dispatch_consumer(tier) for tier in subjects.TIERS}
        for consumer in await self.bus.consumers(subjects.RENDER_JOBS):
            if consumer.name.startswith(subjects.LEGACY_RENDER_CONSUMER_PREFIX) and consumer.name not in ours:
                await self.bus.delete_consumer(subjects.RENDER_JOBS, consumer.name)
        for tier in subjects.TIERS:
            config = ConsumerConfig(
                durable_name=subjects.render_dispatch_consumer(tier),
                filter_subject=subjects.render_job(tier, "*"),
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait_s,
                max_deliver=self.max_deliver,
                max_ack_pending=self.window,
            )
            await self.bus.add_consumer(subjects.RENDER_JOBS, config)  # or update it

    async def _pull(self, tier: str, inbox: str) -> None:
        """Keep one pull standing per tier, asking for what the window has room for."""
        asked, until = self._asked.get(tier, (0, 0.0))
        if asked > 0 and time.monotonic() < until:
            return
        room = min(PULL_BATCH, self.window - self.jobs.depth().get(tier, 0))
        if room <= 0:
            return
        self._asked[tier] = (room, time.monotonic() + PULL_EXPIRES_S + 0.5)
        await self.bus.pull_request(
            subjects.RENDER_JOBS, subjects.render_dispatch_consumer(tier), room, PULL_EXPIRES_S, inbox
        )

    def _arrival_handler(self, tier: str):
        async def arrived(msg: Msg) -> None:
            if msg.headers and msg.headers.get("Status"):  # the pull ended (408 expired, 409, 404)
                self._asked[tier] = (0, 0.0)
                self._pull_ended.set()
                return
            asked, until = self._asked.get(tier, (0, 0.0))
            self._asked[tier] = (asked - 1, until)
            if asked - 1 <= 0:
                self._pull_ended.set()
            if not self.dispatching:  # stepped down while the pull stood: straight back
                await _give_back_msg(msg)
                return
            for item in await consuming.checked(
                self.bus, [msg], subjects.RENDER_JOBS, (RenderRequested,), self.max_attempts
            ):
                job: RenderRequested = item.event
                self.jobs.add(
                    tier, job.user_id, msg.metadata.sequence.stream, Held(msg, job), self.shares.get(job.plan, 1)
                )
            arrived, self._arrived = self._arrived, asyncio.Event()
            arrived.set()

        return arrived

    async def _extend(self) -> None:
        """Tell JetStream the held jobs are in hand, so it does not hand them out again."""
        for _, held in list(self.jobs.all()):
            try:
                await held.msg.in_progress()
            except nats.errors.Error as error:
                log.warning("could not extend job %s: %s", held.job.request_id, error)

    async def _give_back(self) -> None:
        """Stepping down: every held job back to JetStream, for the next dispatcher."""
        held = list(self.jobs.all())
        for seq, job in held:
            self.jobs.drop(seq)
            await _give_back_msg(job.msg)
        if held:
            log.info("handed back %d jobs", len(held))

    # -- claims -----------------------------------------------------------------------------

    async def _answer(self, data: bytes) -> bytes:
        try:
            claim = decode_json(data, RenderClaim)
        except msgspec.DecodeError as error:
            log.warning("a claim that is not one: %s", error)
            return msgspec.json.encode(RenderClaimed(jobs=[]))
        key = tuple(claim.batch_key) if claim.batch_key else None
        slots = max(0, min(claim.slots, 1024))
        deadline = time.monotonic() + min(claim.wait_ms, 30_000) / 1000
        taken = self.jobs.take(slots, key)
        while not taken and self.dispatching and time.monotonic() < deadline:
            await _wait(self._arrived, deadline - time.monotonic())
            taken = self.jobs.take(slots, key)
        more = bool(taken) and self.jobs.holds(batch_key(taken[0].job))
        jobs = [ClaimedJob(h.msg.subject, h.msg.reply, h.msg.data, dict(h.msg.headers or {}) or None) for h in taken]
        return msgspec.json.encode(RenderClaimed(jobs=jobs, more=more))


async def _give_back_msg(msg: Msg) -> None:
    """Back to JetStream once this dispatcher's standing pulls have ended: sooner, the
    server would hand it straight back to them, round and round, using up its deliveries."""
    try:
        await msg.nak(delay=PULL_EXPIRES_S + 0.5)
    except nats.errors.Error:
        pass  # JetStream hands it out again after ack_wait anyway


async def _wait(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        pass
