"""The outbox relay: publishes decisions that were committed but never published.

The prompt handler publishes right after its commit and then clears the outbox. A decision
still in the outbox after a few seconds was left by a process that died in between (or
whose publish failed); the relay sends it. JetStream drops the copy if the handler did get
it out (`Nats-Msg-Id` and the per-request subject guard), so the relay may be late or
repeat itself, never wrong. Each quota process runs one (`QuotaService.relay`); `SKIP
LOCKED` shares the work.
"""

from __future__ import annotations

import logging

import asyncpg

from services.quota import log as quota_log
from services.quota.log_events import Decision
from shared import subjects
from shared.bus import Bus
from shared.events import QuotaDenied

logger = logging.getLogger("kiln.quota.relay")

GRACE_S = 3.0  # leave a fresh decision to the handler that made it
POLL_S = 1.0


async def publish_decision(bus: Bus, decision: Decision) -> None:
    """Publish a logged decision; JetStream refuses a second copy on the request's subject."""
    await bus.publish(subjects.quota_decided(decision.user_id, decision.request_id), decision, first_on_subject=True)
    if isinstance(decision, QuotaDenied):  # a denial is the request's outcome
        await bus.publish(subjects.outcome(decision.user_id, decision.request_id), decision, first_on_subject=True)


async def relay_once(pool: asyncpg.Pool, bus: Bus, grace_s: float = GRACE_S) -> int:
    """Publish one round of stranded decisions; returns how many."""
    async with quota_log.unpublished(pool, grace_s) as decisions:
        for decision in decisions:
            await publish_decision(bus, decision)
    if decisions:
        logger.warning("relayed %d decisions left unpublished", len(decisions))
    return len(decisions)
