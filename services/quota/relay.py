"""The outbox relay: publishes decisions that were committed but never published.

The prompt handler publishes right after its commit and then clears the outbox. A decision
still in the outbox after a few seconds was left by a process that died in between (or
whose publish failed); the relay sends it. JetStream drops the copy if the handler did get
it out (`Nats-Msg-Id` and the per-request subject guard), so the relay may be late or
repeat itself, never wrong. Each quota process runs one; `SKIP LOCKED` shares the work.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from services.quota import log as quota_log
from services.quota.application import publish_decision
from shared.bus import Bus
from shared.service import sleep_unless_stopped

logger = logging.getLogger("kiln.quota.relay")

GRACE_S = 3.0  # leave a fresh decision to the handler that made it
POLL_S = 1.0


async def relay_once(pool: asyncpg.Pool, bus: Bus, grace_s: float = GRACE_S) -> int:
    """Publish one round of stranded decisions; returns how many."""
    async with quota_log.unpublished(pool, grace_s) as decisions:
        for decision in decisions:
            await publish_decision(bus, decision)
    if decisions:
        logger.warning("relayed %d decisions left unpublished", len(decisions))
    return len(decisions)


async def run_relay(pool: asyncpg.Pool, bus: Bus, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await relay_once(pool, bus)
        except Exception as error:  # noqa: BLE001 — the database or bus is down: try again later
            logger.warning("relay round failed, will retry: %r", error)
        await sleep_unless_stopped(stop, POLL_S)
