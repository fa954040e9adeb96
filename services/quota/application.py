"""The quota application: load the user's state from the log, run the policy, append the
decision — then, only after the commit, publish it.

Publishing after the commit and acking the prompt only after publishing makes the log the
source of truth: if the process dies between commit and publish, JetStream redelivers the
prompt, `decision_for` finds the recorded decision and publishes that same decision again
(JetStream refuses a second message on the request's decision subject).

A request is identified by user and request id together: the id is the client's
idempotency key, unique only within that user's requests.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from nats.aio.msg import Msg
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from services.quota import log as quota_log
from services.quota import policy
from shared import subjects
from shared.bus import Bus
from shared.events import PromptSubmitted, QuotaDenied

logger = logging.getLogger("kiln.quota")

MAX_CONFLICT_RETRIES = 10
DEFAULT_PLAN = "free"


class QuotaService:
    def __init__(self, engine: AsyncEngine, bus: Bus) -> None:
        self.engine = engine
        self.bus = bus

    async def handle_prompt(self, event: PromptSubmitted, msg: Msg) -> None:
        # The bus has checked the message: a PromptSubmitted, sent on its own user's subject.
        # 1. A request that has ended already (a copy given up on during an outage) stays ended.
        if await self.bus.outcome_recorded(event.user_id, event.request_id):
            return
        # 2. Decide (or find the decision already recorded for this request).
        decision = await self.grant_or_deny(event)
        # 3. Publish what the log holds; once per request, however often we get here.
        await self.bus.publish(
            subjects.quota_decided(event.user_id, event.request_id), decision, first_on_subject=True
        )
        if isinstance(decision, QuotaDenied):  # a denial is the request's outcome
            await self.bus.publish(
                subjects.outcome(event.user_id, event.request_id), decision, first_on_subject=True
            )

    async def grant_or_deny(self, submission: PromptSubmitted) -> quota_log.Decision:
        stream = quota_log.user_stream(submission.user_id)
        for _ in range(MAX_CONFLICT_RETRIES):
            async with self.engine.begin() as conn:
                recorded = await quota_log.decision_for(conn, stream, submission.request_id)
                if recorded is not None:
                    return recorded  # a redelivery or a re-publish: same request, same answer
                now = datetime.now(timezone.utc)
                version = await quota_log.stream_version(conn, stream)
                used = await quota_log.granted_on(conn, stream, policy.utc_day(now))
                decision = policy.decide(submission, DEFAULT_PLAN, used, now)
                try:
                    await quota_log.append(
                        conn,
                        stream,
                        version + 1,
                        decision,
                        {
                            "policy_version": policy.POLICY_VERSION,
                            "used_before": used,
                            "trace_id": _current_trace_id(),
                        },
                    )
                except quota_log.Conflict:
                    logger.info("conflict on %s, deciding again", stream)
                    continue
            return decision
        raise quota_log.Conflict(f"{stream}: still conflicting after {MAX_CONFLICT_RETRIES} tries")


def _current_trace_id() -> str:
    """The request's trace, so an auditor can go from a log row to its trace."""
    return format(trace.get_current_span().get_span_context().trace_id, "032x")
