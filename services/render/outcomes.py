"""What the worker tells the rest of Kiln about a job: how long it waited for a GPU (a span
and a histogram), its step progress while it renders, and its one outcome, completed or
failed, after which the job is acked."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from opentelemetry import trace

from services.render import metrics
from services.render.cancels import JobKey, job_key
from shared import subjects
from shared.bus import Bus
from shared.consuming import Received
from shared.events import RenderCompleted, RenderFailed, RenderProgress, RenderRequested, as_utc
from shared.telemetry import context_from_headers, mark_failed

log = logging.getLogger("kiln.render")

PROGRESS_INTERVAL_S = 0.1  # at most ten progress events a second per job


class Outcomes:
    def __init__(self, bus: Bus, worker_id: str) -> None:
        self.bus = bus
        self.worker_id = worker_id
        # Job → ms from its request to its batch's start, reported with its outcome. An entry
        # lives while its job is in hand: taken by the outcome, or forgotten (`forget`).
        self.queued_ms: dict[JobKey, float] = {}

    def queue_wait(self, item: Received, started: datetime) -> None:
        """The time the job waited for a GPU, from context's request to the start of the
        batch that takes it: a span of its own in the request's trace, the queue-wait
        histogram, and its outcome's `queued_ms`."""
        job: RenderRequested = item.event
        wait = self.bus.tracer.start_span(
            "render queue wait",
            context=context_from_headers(item.msg.headers),
            start_time=_ns(job.requested_at),
            attributes={"kiln.request_id": job.request_id, "kiln.tier": job.tier, "kiln.worker_id": self.worker_id},
        )
        wait.end(end_time=_ns(started))
        waited_s = (started - as_utc(job.requested_at)).total_seconds()
        metrics.queue_wait_seconds.record(max(0.0, waited_s), {"tier": job.tier})  # (clocks differ a little)
        self.queued_ms[job_key(job)] = waited_s * 1000

    def forget(self, job: RenderRequested) -> None:
        """The job left the worker's hands without an outcome from it (handed to another
        attempt, or given up): its queue wait goes too."""
        self.queued_ms.pop(job_key(job), None)

    async def complete(self, item: Received, render_ms: float, batch_size: int = 1) -> None:
        job: RenderRequested = item.event
        completed = RenderCompleted(
            request_id=job.request_id,
            user_id=job.user_id,
            conversation_id=job.conversation_id,
            image_key=subjects.image_key(job.user_id, job.request_id),
            width=job.width,
            height=job.height,
            seed=job.seed,
            render_ms=render_ms,
            worker_id=self.worker_id,
            batch_size=batch_size,
            plan=job.plan,
            queued_ms=self.queued_ms.pop(job_key(job), None),
            prompt=job.prompt,
            composition=job.composition,
        )
        await self._report(item, completed)

    async def fail(self, item: Received, reason: str, detail: str) -> None:
        job: RenderRequested = item.event
        log.warning("job %s failed for good: %s %s", job.request_id, reason, detail)
        if reason != "cancelled":  # a cancel is what the user asked for, not a failure
            mark_failed(item.span, f"{reason}: {detail}")
        self.forget(job)
        failed = RenderFailed(
            request_id=job.request_id,
            user_id=job.user_id,
            conversation_id=job.conversation_id,
            reason=reason,
            detail=detail,
            worker_id=self.worker_id,
            plan=job.plan,
        )
        await self._report(item, failed)

    async def _report(self, item: Received, outcome: RenderCompleted | RenderFailed) -> None:
        """Publish the job's one outcome (completed and failed share the subject, which
        takes one message ever), in the job's own trace; then ack the job."""
        with trace.use_span(item.span):
            await self.bus.publish(
                subjects.render_event(outcome.user_id, outcome.request_id), outcome, first_on_subject=True
            )
        await item.msg.ack()


class Progress:
    """A batch's step progress, one RenderProgress per job (plain NATS), at most one every
    PROGRESS_INTERVAL_S and always the last step. `step` runs on the render thread: it
    hands the publishing to the event loop, once per report for the whole batch (each
    wake-up of the loop slows the render beside it)."""

    def __init__(self, bus: Bus, todo: list[Received], loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.todo = todo
        self.loop = loop
        self.last_sent = 0.0

    def due(self, step: int, total: int, now: float) -> bool:
        return step >= total or now - self.last_sent >= PROGRESS_INTERVAL_S

    def step(self, step: int, total: int, now: float) -> None:
        if not self.due(step, total, now):
            return
        self.last_sent = now
        asyncio.run_coroutine_threadsafe(self._publish(step, total), self.loop)

    async def _publish(self, step: int, total: int) -> None:
        for item in self.todo:
            job: RenderRequested = item.event
            progress = RenderProgress(
                request_id=job.request_id,
                user_id=job.user_id,
                conversation_id=job.conversation_id,
                step=step,
                total_steps=total,
            )
            subject = subjects.render_progress(job.user_id, job.request_id)
            # In the job's own trace, not the batch's (this thread runs in the batch span).
            await self.bus.publish_plain(subject, progress, span=item.span)


def _ns(moment: datetime) -> int:
    """A timestamp as OpenTelemetry takes it: nanoseconds since the epoch."""
    return int(as_utc(moment).timestamp() * 1e9)
