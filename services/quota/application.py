"""The quota application: decide a batch of prompts in one transaction, commit, then publish.

For each batch the bus hands over (whatever prompts were waiting, up to a few hundred):
  1. drop requests that have ended already (given up on during an outage): they stay ended;
  2. split the batch by the users' log partitions; for each, at once, under that
     partition's append lock: find decisions already recorded (redeliveries, resends),
     load the other users' state, run the policy in order, append the new decisions;
  3. after the commit, publish each decision (a denial is also the request's outcome);
  4. mark them published, so the outbox relay need not send them.
The bus acks the prompts after that. If the process dies after the commit, the relay
publishes what it left in the outbox, and the redelivered prompts find their decisions
in the log: the same request always gets the same decision.

Refunds: a request that was granted and then failed for good (its outcome is a
RequestFailed) gets a QuotaRefunded, so the failed image does not count.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
from opentelemetry import trace

from services.quota import checkpoints, metrics, plans, policy
from services.quota import log as quota_log
from services.quota.log_events import Decision, QuotaRefunded
from services.quota.migrate import schema_problem
from services.quota.plans import DEFAULT_PLAN, Config
from services.quota.pressure import FleetMonitor, Shed
from services.quota.relay import POLL_S as RELAY_POLL_S
from services.quota.relay import publish_decision, relay_once
from shared import model_card, subjects
from shared.bus import Bus, Message
from shared.consuming import Received
from shared.events import (
    ID_PATTERN,
    ImageDelivered,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    QuotaStatus,
    RequestFailed,
    as_utc,
)
from shared.failpoints import failpoint
from shared.model_card import ModelCard
from shared.service import CannotStart, sleep_unless_stopped
from shared.settings import Settings

logger = logging.getLogger("kiln.quota")

MAX_CONFLICT_RETRIES = 10
# Connections: a batch's partitions are appended at once, each on its own connection, up to
# this many; more would only queue on 2-8 Postgres cores and crowd max_connections.
POOL_SIZE = 10
FRESH = timedelta(minutes=1)  # younger prompts on a first delivery cannot have ended
DECIDER = f"{socket.gethostname()}-{os.getpid()}"  # which quota process decided


class QuotaService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        config: Config,
        fleet: FleetMonitor,
        card: ModelCard = ModelCard(),
        text_card: ModelCard | None = None,
        checkpoint_key: checkpoints.SigningKey | None = None,
        checkpoint_schedule: checkpoints.Schedule | None = None,
        partitions: int = 1,
    ) -> None:
        self.pool = pool
        self.partitions = partitions  # the log's, read at start (`quota_log.partition_count`)
        self.bus = bus
        self.config = config
        self.fleet = fleet
        self.card = card  # the model's native sizes
        self.text_card = text_card  # those of the model that draws quoted text (None: there is none)
        self.checkpoint_key = checkpoint_key  # signs the log's head (None: no checkpoints)
        self.checkpoint_schedule = checkpoint_schedule or checkpoints.Schedule()
        self._tasks: set[asyncio.Task] = set()
        self.shed = Shed()  # what this process shed lately, for `kiln status`

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, bus: Bus) -> AsyncIterator[QuotaService]:
        """Read the plans, bring the log's schema up to date, connect to it."""
        try:
            config = plans.load(settings.plans_file)
        except plans.ConfigError as error:
            raise CannotStart(f"cannot read the plans: {error}") from error
        try:
            card = model_card.load(settings.model_path)
            text_card = model_card.text_card(settings.model_path)
        except model_card.CardError as error:
            raise CannotStart(f"cannot read the model card: {error}") from error
        try:
            pool = await quota_log.connect(settings.quota_database_address, size=POOL_SIZE)
        except asyncpg.InvalidAuthorizationSpecificationError as error:  # no such role: not migrated
            raise CannotStart(f"cannot connect to the quota log as its role: {error}") from error
        async with pool.acquire() as conn:
            problem = await schema_problem(conn)
            partitions = await quota_log.partition_count(conn) if problem is None else 0
        if problem is not None:
            await pool.close()
            raise CannotStart(problem)
        try:
            fleet = FleetMonitor(config.pressure)
            metrics.watch_pressure(fleet)
            key = checkpoints.signing_key(settings.data_dir)
            schedule = checkpoints.Schedule(every=settings.checkpoint_every, after_s=settings.checkpoint_after_s)
            yield cls(pool, bus, config, fleet, card, text_card, key, schedule, partitions)
        finally:
            await pool.close()

    # -- prompts --------------------------------------------------------------------------

    async def handle_prompts(self, batch: list[Received[PromptSubmitted]]) -> None:
        # 1. A request that has ended already stays ended.
        ended = await asyncio.gather(*(self._ended(d) for d in batch))
        live = [d for d, done in zip(batch, ended, strict=True) if not done]
        if not live:
            return
        # 2. Decide and commit.
        started = time.time_ns()
        decisions, positions, new = await self.decide(live)
        self._trace_append(live, decisions, {_key(decision) for decision in new}, started, time.time_ns())
        for decision in new:
            if isinstance(decision, QuotaDenied):
                metrics.count_denial(decision)
                if decision.pressure != "normal" and decision.reason in ("capacity", "rate_limit"):
                    self.shed.record("shed")
                continue
            if decision.over_soft_cap:
                metrics.count_over_soft_cap(decision)
            if decision.degraded:
                metrics.count_degraded(decision)
                self.shed.record("degraded")
        failpoint("quota.after_commit")  # tests: die with decisions committed, not published
        # 3. Publish what the log holds; once per request, however often we get here.
        await asyncio.gather(*(self._publish(d, decisions[_key(d.event)]) for d in live))
        # 4. The relay need not send these. (In the background: if it is lost, the relay
        #    sends them again and JetStream drops the copies.)
        if positions:
            self._background(quota_log.published(self.pool, positions))

    def _trace_append(
        self,
        batch: list[Received],
        decisions: dict[tuple[str, str], Decision],
        new: set[tuple[str, str]],
        started: int,
        ended: int,
    ) -> None:
        """The decision, and the Postgres write of a new one, in each request's trace. A
        batch shares one transaction: each new decision's write span covers it."""
        for delivery in batch:
            decision = decisions[_key(delivery.event)]
            delivery.span.set_attributes(
                {
                    "kiln.decision": "granted" if isinstance(decision, QuotaGranted) else "denied",
                    "kiln.plan": decision.plan,
                    "kiln.pressure": decision.pressure,
                    **({"kiln.denial_reason": decision.reason} if isinstance(decision, QuotaDenied) else {}),
                }
            )
            if _key(delivery.event) not in new:
                continue  # decided before (a redelivery): nothing written now
            write = self.bus.tracer.start_span(
                "quota log append",
                context=trace.set_span_in_context(delivery.span),
                kind=trace.SpanKind.CLIENT,  # a call to the database
                start_time=started,
                attributes={
                    "db.system.name": "postgresql",
                    "db.operation.name": "INSERT quota_events",
                    "kiln.batch_size": len(new),
                },
            )
            write.end(end_time=ended)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background work failed (the relay will cover it): %r", task.exception())

    async def _ended(self, delivery: Received) -> bool:
        """Whether the request has an outcome already. Only a copy that has been around can
        find one: quota gives a request up only after minutes of retries, and clients check
        for an outcome before sending a prompt again. So a fresh prompt on its first
        delivery (the common case, at full load) is not looked up."""
        fresh = datetime.now(UTC) - as_utc(delivery.event.submitted_at) < FRESH
        if fresh and delivery.attempt == 1:
            return False
        return await self.bus.outcome_recorded(delivery.event.user_id, delivery.event.request_id)

    async def decide(self, batch: list[Received]) -> tuple[dict[tuple[str, str], Decision], list[int], list[Decision]]:
        """Each request's decision (recorded before, or made and appended now), the log
        positions of the new ones, and the new ones. The batch's partitions are decided at
        once, each in its own transaction."""
        by_partition: dict[int, list[Received]] = {}
        for delivery in batch:
            partition = quota_log.partition_of(delivery.event.user_id, self.partitions)
            by_partition.setdefault(partition, []).append(delivery)
        parts = await asyncio.gather(*(self._decide_partition(p, part) for p, part in by_partition.items()))
        decisions: dict[tuple[str, str], Decision] = {}
        positions: list[int] = []
        new: list[Decision] = []
        for part_decisions, part_positions, part_new in parts:
            decisions |= part_decisions
            positions += part_positions
            new += part_new
        return decisions, sorted(positions), new

    async def _decide_partition(
        self, partition: int, batch: list[Received]
    ) -> tuple[dict[tuple[str, str], Decision], list[int], list[Decision]]:
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                async with quota_log.appending(self.pool, partition) as log:
                    metrics.observe_lock_wait(log.lock_wait_s)
                    now = datetime.now(UTC)
                    decisions = await quota_log.decisions_for(log.conn, {_key(d.event) for d in batch})
                    users = await log.users((d.event.user_id, policy.utc_day(now)) for d in batch)
                    entries = self._decide_new(batch, decisions, users, now)
                    positions = await log.append(entries, users)
                return decisions, positions, [entry.event for entry in entries]
            except quota_log.Conflict as error:  # another process, while the partitions grew; the database guards
                logger.warning("append conflict, deciding the batch again: %s", error)
        raise quota_log.Conflict(f"still conflicting after {MAX_CONFLICT_RETRIES} tries")

    def _decide_new(
        self,
        batch: list[Received],
        decisions: dict[tuple[str, str], Decision],
        users: dict[str, quota_log.UserRecord],
        now: datetime,
    ) -> list[quota_log.Entry]:
        """Decide the requests not decided before, in order; each decision is applied to
        its user's state at once, so the next request of that user sees it."""
        pressure, why = self.fleet.level()
        text = self.text_card
        pricing = policy.Pricing(
            sizes=self.card.sizes,
            step_seconds=self.fleet.step_seconds(),
            text_sizes=None if text is None else text.sizes,
            text_chars=0 if text is None else text.max_text_chars,
            text_steps=None if text is None else text.steps,
        )
        entries = []
        for delivery in batch:
            submission: PromptSubmitted = delivery.event
            if _key(submission) in decisions:
                continue  # decided before (or earlier in this batch): same answer
            user = users[submission.user_id]
            state = user.state
            plan_name = user.plan if user.plan in self.config.plans else DEFAULT_PLAN
            plan = self.config.plan(plan_name)
            state_before, active_before = msgspec.to_builtins(state), user.active
            decision = policy.decide(
                submission, plan_name, plan, state, pressure, self.config.shedding, now, pricing, user.active
            )
            policy.apply(state, decision)
            if isinstance(decision, QuotaGranted):
                user.active += 1  # the user's next request in this batch sees this one
            decisions[_key(submission)] = decision
            if isinstance(decision, QuotaGranted) and decision.over_soft_cap:
                logger.warning(
                    "soft cap: %s on %s has %d images today (soft cap %d)",
                    submission.user_id,
                    plan_name,
                    decision.used,
                    plan.soft_cap,
                )
            entries.append(
                quota_log.Entry(
                    decision,
                    {
                        "policy_version": policy.POLICY_VERSION,
                        "decider": DECIDER,
                        "trace_id": delivery.trace_id,
                        "pressure": pressure,
                        "pressure_why": why,
                        # The decision's inputs, so `kiln audit replay` can re-run it.
                        "inputs": {
                            "submission": msgspec.to_builtins(submission),
                            "plan": msgspec.to_builtins(plan),
                            "shedding": msgspec.to_builtins(self.config.shedding),
                            "state_before": state_before,
                            "pricing": msgspec.to_builtins(pricing),
                            "active": active_before,
                        },
                    },
                )
            )
        return entries

    async def _publish(self, delivery: Received, decision: Decision) -> None:
        with trace.use_span(delivery.span):  # the decision continues the request's trace
            await publish_decision(self.bus, decision)

    # -- refunds --------------------------------------------------------------------------

    async def handle_outcome(self, outcome: QuotaDenied | ImageDelivered | RequestFailed) -> None:
        metrics.count_outcome(outcome)
        if isinstance(outcome, QuotaDenied):
            return  # never granted: nothing in progress, nothing to give back
        await quota_log.ended(self.pool, outcome.user_id, outcome.request_id)
        if not isinstance(outcome, RequestFailed):
            return
        async with quota_log.appending(self.pool, quota_log.partition_of(outcome.user_id, self.partitions)) as log:
            granted = (await quota_log.decisions_for(log.conn, [_key(outcome)])).get(_key(outcome))
            if not isinstance(granted, QuotaGranted):
                return  # never granted (denied, or failed before quota): nothing to give back
            if await quota_log.refund_recorded(log.conn, outcome.user_id, outcome.request_id):
                return
            refund = QuotaRefunded(
                request_id=outcome.request_id,
                user_id=outcome.user_id,
                conversation_id=outcome.conversation_id,
                day=granted.day,
                reason=outcome.reason,
                detail=f"{outcome.stage}: {outcome.detail}"[:500],
            )
            await log.append([quota_log.Entry(refund, {"policy_version": policy.POLICY_VERSION})])
        logger.info("refunded %s/%s (%s)", outcome.user_id, outcome.request_id, outcome.reason)

    # -- status ---------------------------------------------------------------------------

    async def answer_status(self, subject: str) -> QuotaStatus | dict[str, str]:
        """The answer to `kiln.quota.status.<user>`: the user's QuotaStatus for today, or
        `{"error": …}` saying why not."""
        user_id = subjects.QUOTA_STATUS.value(subject, "user")
        if not ID_PATTERN.match(user_id):
            return {"error": f"not a user id: {user_id!r}"}
        try:
            return await self.status(user_id)
        except (OSError, asyncpg.PostgresError) as error:
            logger.warning("quota status for %s: %r", user_id, error)
            return {"error": "quota's database is unavailable; try again shortly"}

    async def answer_pressure(self, subject: str) -> dict[str, str]:
        """The answer to `kiln.quota.pressure`: the level quota sheds load by, and why; and
        what this process shed and degraded in the last 10 minutes."""
        level, why = self.fleet.level()
        counts = self.shed.counts()
        return {"level": level, "why": why, "shed_10m": str(counts["shed"]), "degraded_10m": str(counts["degraded"])}

    async def hear_heartbeat(self, message: Message) -> None:
        self.fleet.hear(message.data, message.subject)

    # -- the outbox relay -----------------------------------------------------------------

    async def relay(self, stop: asyncio.Event) -> None:
        """Publish, every second, decisions a crash left committed but unpublished."""
        while not stop.is_set():
            try:
                await relay_once(self.pool, self.bus)
            except Exception as error:  # noqa: BLE001 — the database or bus is down: try again later
                logger.warning("relay round failed, will retry: %r", error)
            await sleep_unless_stopped(stop, RELAY_POLL_S)

    # -- checkpoints ----------------------------------------------------------------------

    async def checkpoint(self, stop: asyncio.Event) -> None:
        """Sign the log's head and publish it outside Postgres (`checkpoints.py`)."""
        if self.checkpoint_key is not None:
            await checkpoints.run(
                self.pool, self.checkpoint_key, self._publish_checkpoint, stop, self.checkpoint_schedule
            )

    async def _publish_checkpoint(self, checkpoint: checkpoints.Checkpoint) -> None:
        # One message per position, however many quota processes sign it.
        await self.bus.publish(
            subjects.AUDIT_CHECKPOINT.subject(), checkpoint, msg_id=f"checkpoint-{checkpoint.position}"
        )

    async def status(self, user_id: str) -> QuotaStatus:
        now = datetime.now(UTC)
        day = policy.utc_day(now)
        async with self.pool.acquire() as conn:
            record = (await quota_log.user_records(conn, [(user_id, day)]))[user_id]
        plan_name = record.plan if record.plan in self.config.plans else DEFAULT_PLAN
        usage = record.state.on(day)
        return QuotaStatus(
            user_id=user_id,
            plan=plan_name,
            used=usage.used,
            limit=policy.daily_limit(self.config.plan(plan_name), usage),
            day=day,
            resets_at=policy.next_utc_midnight(now),
        )


def _key(event: PromptSubmitted | Decision | RequestFailed) -> tuple[str, str]:
    return (event.user_id, event.request_id)
