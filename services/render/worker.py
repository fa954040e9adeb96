"""The render worker: claim compatible jobs, render them as one batch, store each PNG,
report each outcome, and only then ack each job.

events in   RenderRequested  (kiln.render.jobs.<tier>.<user>, via the fair queue)  intake.py
            cancels          (kiln.render.cancel.<user>.<request>)                  cancels.py
decide      batching: up to `max_batch` jobs with the same mode, size and steps, waiting at
            most `max_wait_s` for a batch to fill; the thermal guard may shrink or pause it
            renders started per job, across the fleet                              attempts.py
events out  RenderProgress   (plain NATS, throttled)                                outcomes.py
            RenderCompleted | RenderFailed  (kiln.render.events.<user>.<request>, one each)
storage     PNGs in the JetStream Object Store (`kiln-images/<user>/<request>.png`) storage.py

If the worker dies, JetStream hands its jobs to another after `ack_wait`. The object store
is checked before rendering, so a job whose image was already stored is not drawn twice; the
outcome subject takes one outcome per request. On SIGTERM the worker finishes the batch in
hand and gives back the jobs it holds but has not started, so an update rolls through the
fleet without losing work.

`_run_batch` is the spine, step by step; the detail is in the helpers below it and in the
modules named above.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, aclosing
from datetime import datetime

import nats.errors
from nats.js.object_store import ObjectStore
from opentelemetry import trace
from PIL import Image

from services.render import metrics
from services.render.attempts import RENDER_ATTEMPTS, Attempts, out_of_attempts
from services.render.cancels import Cancels, JobKey, job_key
from services.render.intake import IDLE_POLL_S, Intake
from services.render.outcomes import Outcomes, Progress
from services.render.pipeline import Cancelled, OverBudget, Renderer, on_torch_thread
from services.render.queue import JobQueue
from services.render.status import Throughput, WorkerStatus
from services.render.storage import BadInput, ImageStore
from services.render.thermal import ThermalGuard
from shared import consuming, cost, failpoints
from shared.bus import Bus
from shared.consuming import Received
from shared.events import MAX_SIDE, MAX_STEPS, RenderRequested, utcnow
from shared.failpoints import failpoint
from shared.service import sleep_unless_stopped
from shared.telemetry import mark_failed, record_failure

log = logging.getLogger("kiln.render")

REDELIVER_AFTER_S = 5.0  # a job the bus failed mid-way comes back after this, not ack_wait

# A batch is stopped once its time per image passes its plans' budget by this much: quota
# priced it within the budget, so only a worker far slower than measured gets here.
OVER_BUDGET_FACTOR = 2.0
OVER_BUDGET_SLACK_S = 2.0

Rendered = tuple[list[Received], list[bytes], float]  # jobs rendered together, their PNGs, ms


class RenderWorker:
    def __init__(
        self,
        bus: Bus,
        store: ObjectStore,
        renderer: Renderer,
        worker_id: str,
        queue: JobQueue,
        guard: ThermalGuard,
        attempts: Attempts,
        *,
        max_wait_s: float,
        max_side: int = MAX_SIDE,
        max_steps: int = MAX_STEPS,
    ) -> None:
        self.bus = bus
        self.renderer = renderer
        self.worker_id = worker_id
        self.queue = queue
        self.guard = guard
        self.attempts = attempts
        self.max_side, self.max_steps = max_side, max_steps
        self.intake = Intake(bus, queue, max_wait_s)
        self.cancels = Cancels(bus)
        self.images = ImageStore(store, bus.tracer)
        self.outcomes = Outcomes(bus, worker_id)
        # Tell JetStream well before `ack_wait` that the jobs in hand are being worked on.
        self.in_progress_s = min(10.0, queue.ack_wait_s / 3)
        self.throughput = Throughput()
        self.clock = cost.StepClock()  # seconds per image-step by size: quota prices requests by it
        self._rendering: tuple[list[RenderRequested], datetime | None] = ([], None)  # the batch now, since
        self._finishing: asyncio.Future | None = None  # the last batch's stores and reports
        # The deliveries (by id(), not by job: a redelivery may be in hand while the first
        # delivery is still being stored) whose image is being stored; each leaves when stored.
        self._storing: set[int] = set()

    def status(self) -> WorkerStatus:
        """What the heartbeat reports of this worker."""
        return WorkerStatus(
            worker_id=self.worker_id,
            device=self.renderer.device,
            model=self.renderer.model,
            batch_limit=self.guard.batch_limit(),
            temperature_c=self.guard.temperature(),
            images_per_s=self.throughput.per_second(),
            rendering=tuple(f"{job.user_id}/{job.request_id}" for job in self._rendering[0]),
            rendering_since=self._rendering[1],
            step_seconds=dict(self.clock.table),
            rendering_left_s=self._rendering_left_s(),
        )

    def _rendering_left_s(self) -> float:
        """How long the batch in the pipeline should still take, by the measured figures."""
        jobs, since = self._rendering
        if not jobs or since is None:
            return 0.0
        first = jobs[0]
        total = cost.estimate_s(self.clock.table, first.width, first.height, first.steps) or 0.0
        return max(0.0, total * len(jobs) - (utcnow() - since).total_seconds())

    def cancel_requested(self, user_id: str, request_id: str) -> None:
        self.cancels.add(user_id, request_id)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                limit = self.guard.batch_limit()
                if limit == 0:  # too hot: take nothing new until it cools; cooler workers take what we hold
                    await self.intake.hand_back()
                    await sleep_unless_stopped(stop, IDLE_POLL_S)
                    continue
                batch: list[Received] = []
                try:
                    batch = await self.intake.next_batch(limit, stop, idle=self.finish_previous)
                    if batch:
                        await self._run_batch(batch)
                except nats.errors.Error as error:
                    # What was not acked, JetStream hands out again (what is being stored: by _store).
                    log.warning("bus error, jobs will be redelivered: %s", error)
                    await _redeliver_soon([item for item in batch if id(item) not in self._storing])
                    await sleep_unless_stopped(stop, IDLE_POLL_S)
        finally:
            try:
                await self.finish_previous()
            except nats.errors.Error as error:
                log.warning("bus error, jobs will be redelivered: %s", error)
            await self.intake.hand_back()

    async def _run_batch(self, batch: list[Received]) -> None:
        """One batch of compatible jobs, from claimed to reported. Its images are stored and
        its outcomes reported while the next batch renders."""
        started = utcnow()
        try:
            # 1. Each job's wait for a GPU (a span, a histogram, its outcome's `queued_ms`),
            #    and the span of its handling here, both in the request's own trace.
            for item in batch:
                self.outcomes.queue_wait(item, started)
                item.span = self.bus.span(item.event, item.msg)
            # 2. Settle without rendering a job whose image is stored (a redelivery) or
            #    that was cancelled.
            settled = await asyncio.gather(*(self._settled_before(item) for item in batch))
            todo = [item for item, done in zip(batch, settled, strict=True) if not done]
            # 3. Check each job again and load the images an edit starts from; a job that
            #    fails the checks fails as invalid.
            sources, masks, todo = await self._inputs(todo)
            # 4. Count each render starting; a job whose workers died mid-render too often
            #    fails for good.
            attempts, todo = await self._starting(todo)
            # 5. Render: one pipeline call, or halves of it when out of memory, or one job
            #    at a time when the pipeline rejects one. A part that fails is reported.
            async with aclosing(self._rendered(todo, sources, masks, attempts)) as rendered:
                async for part, pngs, render_ms in rendered:
                    # 6. Measure: the step clock quota prices requests by, and the metrics.
                    first: RenderRequested = part[0].event
                    self.clock.record(first.width, first.height, len(part), first.steps, render_ms / 1000)
                    metrics.batch_sizes.record(len(part))
                    metrics.render_seconds.record(render_ms / 1000)
                    # 7. Store and report while the next batch renders: the images are in
                    #    hand, and the bus's disk writes need no CPU. One batch finishes at a time.
                    self._storing.update(id(item) for item in part)
                    finishing = asyncio.gather(
                        *(self._store(item, png, render_ms, len(part)) for item, png in zip(part, pngs, strict=True))
                    )
                    await self.finish_previous()
                    self._finishing = asyncio.ensure_future(finishing)
        finally:
            # 8. A job not being stored is done with here: end its span, drop its wait.
            for item in batch:
                if id(item) not in self._storing:
                    _end(item.span)
                    self.outcomes.forget(item.event)

    # -- the steps --------------------------------------------------------------------------

    async def _settled_before(self, item: Received) -> bool:
        job: RenderRequested = item.event
        # Both lookups at once: each is a round trip to the bus, on every job's path.
        render_ms, cancelled = await asyncio.gather(self.images.stored_render_ms(job), self.cancels.is_cancelled(job))
        if render_ms is not None:
            await self.outcomes.complete(item, render_ms)
            return True
        if cancelled:
            await self.outcomes.fail(item, "cancelled", "cancelled before it was rendered")
            return True
        return False

    async def _inputs(self, todo: list[Received]) -> tuple[list, list, list[Received]]:
        sources: list[Image.Image | None] = []
        masks: list[Image.Image | None] = []
        ready = []
        for item in todo:
            try:
                source, mask = await self.images.inputs(item.event, self.max_side, self.max_steps)
            except BadInput as error:
                await self.outcomes.fail(item, "invalid", str(error))
                continue
            sources.append(source)
            masks.append(mask)
            ready.append(item)
        return sources, masks, ready

    async def _starting(self, todo: list[Received]) -> tuple[dict[JobKey, int], list[Received]]:
        attempts: dict[JobKey, int] = {}  # this batch's, by (user, request)
        ready = []
        started = await asyncio.gather(*(self.attempts.start(item.event, item.attempt == 1) for item in todo))
        for item, attempt in zip(todo, started, strict=True):
            if out_of_attempts(attempt):
                why = f"not finished in {RENDER_ATTEMPTS} renders"
                mark_failed(item.span, why)
                await consuming.give_up(self.bus, item.event, item.msg, why)
                continue
            attempts[job_key(item.event)] = attempt
            ready.append(item)
        return attempts, ready

    async def _rendered(
        self, todo: list[Received], sources: list, masks: list, attempts: dict[JobKey, int]
    ) -> AsyncIterator[Rendered]:
        """`todo` rendered as one batch; if that fails, the parts worth rendering apart."""
        if not todo:
            return
        parts: list[slice] = []
        try:
            failpoint("render.job")  # tests: a render that fails every time, or a worker that dies
            with self._batch_span(todo) as batch_span:
                pngs, render_ms = await self._render(todo, sources, masks, batch_span)
        except Exception as error:  # noqa: BLE001 — each failure is settled or split in _render_failed
            parts = await self._render_failed(todo, error, attempts)
        else:
            yield todo, pngs, render_ms
        for part in parts:
            async with aclosing(self._rendered(todo[part], sources[part], masks[part], attempts)) as rendered:
                async for each in rendered:
                    yield each

    async def _render_failed(self, todo: list[Received], error: Exception, attempts: dict[JobKey, int]) -> list[slice]:
        """Settle a failed batch's jobs, or return the parts of it to render apart."""
        if isinstance(error, Cancelled | OverBudget):
            reason = "cancelled" if isinstance(error, Cancelled) else "too_costly"
            for item in todo:
                await self.outcomes.fail(item, reason, str(error))
            return []
        if isinstance(error, ValueError):  # the pipeline rejected a job: find which, fail only it
            if len(todo) > 1:
                return [slice(index, index + 1) for index in range(len(todo))]
            await self.outcomes.fail(todo[0], "invalid", str(error))
            return []
        if _out_of_memory(error) and len(todo) > 1:  # smaller batches may fit: halves, down to one job
            log.warning("a batch of %d ran out of memory (%s); rendering it in halves", len(todo), error)
            half = len(todo) // 2
            return [slice(0, half), slice(half, None)]
        # Anything else (a driver error, a bug, one job out of memory): retried with
        # back-off, and after its last attempt the request ends as failed.
        for item in todo:
            record_failure(item.span, error)
            await consuming.retry_or_give_up(self.bus, item, error, attempts[job_key(item.event)], RENDER_ATTEMPTS)
        return []

    async def finish_previous(self) -> None:
        """Wait until the previous batch's images are stored and its jobs acked."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            await finishing

    async def _store(self, item: Received, png: bytes, render_ms: float, batch_size: int) -> None:
        try:
            if item.event in self.cancels:  # its batch went on without it
                await self.outcomes.fail(item, "cancelled", "cancelled while its batch rendered; not stored")
                return
            await self.images.put(item, png, render_ms, batch_size)
            self.throughput.add()
            await self.outcomes.complete(item, render_ms, batch_size=batch_size)
        except nats.errors.Error:
            # Rendered again, or only reported if its image was stored.
            await _redeliver_soon([item])
            raise
        finally:
            self._storing.discard(id(item))
            self.outcomes.forget(item.event)
            _end(item.span)

    # -- the pipeline call ------------------------------------------------------------------

    def _batch_span(self, todo: list[Received]) -> AbstractContextManager[trace.Span]:
        """One span for the pipeline call, linked to every request in it (and in the trace
        of the first). Each request's own span names the batch it rendered in."""
        first: RenderRequested = todo[0].event
        return self.bus.tracer.start_as_current_span(
            "render batch",
            context=trace.set_span_in_context(todo[0].span),
            links=[trace.Link(item.span.get_span_context()) for item in todo],
            attributes={
                "kiln.batch_size": len(todo),
                "kiln.steps": first.steps,
                "kiln.mode": first.mode,
                "kiln.width": first.width,
                "kiln.height": first.height,
                "kiln.model": self.renderer.model,
                "kiln.worker_id": self.worker_id,
                "kiln.device": self.renderer.device,
            },
        )

    async def _render(
        self, todo: list[Received], sources: list, masks: list, batch_span: trace.Span
    ) -> tuple[list[bytes], float]:
        jobs: list[RenderRequested] = [item.event for item in todo]
        progress = Progress(self.bus, todo, asyncio.get_running_loop())
        budgets = [job.budget_s for job in jobs]
        # The batch may run until its most generous plan's budget (per image) is far passed.
        budget_s = None if None in budgets else max(budgets)  # type: ignore[type-var]
        render_started = time.monotonic()
        context = batch_span.get_span_context()
        for item in todo:
            item.span.set_attributes(
                {
                    "kiln.batch_size": len(todo),
                    "kiln.batch.trace_id": format(context.trace_id, "032x"),
                    "kiln.batch.span_id": format(context.span_id, "016x"),
                }
            )

        def on_step(step: int, total: int) -> None:
            # Runs on the render thread: touches the cancels (reads only) and the progress.
            batch_span.add_event("step", {"kiln.step": step})  # the step timings
            failpoint("render.step")  # tests: a worker slower than measured (`render.step:slow`)
            if all(job in self.cancels for job in jobs):
                raise Cancelled(step, total)
            now = time.monotonic()
            per_image_s = (now - render_started) / len(jobs)
            if over_budget(per_image_s, budget_s):
                raise OverBudget(step, total, per_image_s, budget_s)  # type: ignore[arg-type]
            progress.step(step, total, now)

        if failpoints.armed("render.batch:oom") and len(jobs) > 2:  # tests: a device that fits 2 at once
            raise MemoryError(f"failpoint: out of memory for a batch of {len(jobs)}")
        rendering = asyncio.ensure_future(on_torch_thread(self.renderer.render_batch, jobs, on_step, sources, masks))
        metrics.InFlight.jobs += len(todo)
        self._rendering = (jobs, utcnow())  # for the heartbeat
        try:
            return await self._while_rendering(rendering, todo)
        finally:
            metrics.InFlight.jobs -= len(todo)
            self._rendering = ([], None)

    async def _while_rendering(self, rendering: asyncio.Future, todo: list[Received]) -> tuple[list[bytes], float]:
        """Wait for the pipeline call, telling JetStream now and then that its jobs, and
        those held for the next batch, are still ours."""
        while True:
            done, _ = await asyncio.wait({rendering}, timeout=self.in_progress_s)
            if done:
                return rendering.result()
            for item in [*todo, *self.intake.held]:
                try:
                    await item.msg.in_progress()
                except nats.errors.Error as error:
                    log.warning("could not extend job %s: %s", item.event.request_id, error)


async def _redeliver_soon(items: list[Received]) -> None:
    """Jobs the bus failed mid-way (a cluster electing a stream's leader after a node died)
    come back in seconds rather than after ack_wait; a job acked already stays done."""
    for item in items:
        try:
            await item.msg.nak(delay=REDELIVER_AFTER_S)
        except nats.errors.Error:
            return  # (our node is the one gone) they come back after ack_wait


def over_budget(per_image_s: float, budget_s: float | None) -> bool:
    """A batch far slower per image than its most generous plan allows (None: no budget)."""
    return budget_s is not None and per_image_s > budget_s * OVER_BUDGET_FACTOR + OVER_BUDGET_SLACK_S


def _out_of_memory(error: BaseException) -> bool:
    """A device (or host) out of memory: torch.OutOfMemoryError, or the RuntimeError an
    older torch or another backend raises."""
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def _end(span: trace.Span) -> None:
    """End a job's span once, whichever path finishes the job first."""
    if span.is_recording():
        span.end()
