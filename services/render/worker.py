"""The render worker: claim compatible jobs, render them as one batch, store each PNG,
report each outcome, and only then ack each job.

events in   RenderRequested  (kiln.render.jobs.<tier>.<user>, via the fair queue)
            cancels          (kiln.render.cancel.<user>.<request>)
decide      batching: up to `max_batch` jobs with the same mode, size and steps, waiting at
            most `max_wait_s` for a batch to fill; the thermal guard may shrink or pause it
events out  RenderProgress   (plain NATS, throttled)
            RenderCompleted | RenderFailed  (kiln.render.events.<user>.<request>, one each)
storage     PNGs in the JetStream Object Store (`kiln-images/<user>/<request>.png`)

If the worker dies, JetStream hands its jobs to another after `ack_wait`. The object store
is checked before rendering, so a job whose image was already stored is not drawn twice; the
outcome subject takes one outcome per request. On SIGTERM the worker finishes the batch in
hand and gives back the jobs it holds but has not started, so an update rolls through the
fleet without losing work.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from contextlib import AbstractContextManager
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.js.api import ObjectMeta
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from opentelemetry import trace
from PIL import Image

from services.render import metrics
from services.render.pipeline import Cancelled, OverBudget, Renderer, batch_key
from services.render.queue import JobQueue
from services.render.status import Throughput, WorkerStatus
from services.render.thermal import ThermalGuard
from shared import consuming, cost, failpoints, subjects
from shared.bus import Bus
from shared.consuming import Received
from shared.events import (
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    RenderCompleted,
    RenderFailed,
    RenderProgress,
    RenderRequested,
    as_utc,
    utcnow,
)
from shared.failpoints import failpoint
from shared.service import sleep_unless_stopped
from shared.telemetry import context_from_headers, mark_failed, record_failure

log = logging.getLogger("kiln.render")

RENDER_ATTEMPTS = 3  # renders started per job before it fails for good (crashed workers included)
# Deliveries per job, hand-backs (drain, heat) included, before the bus gives up on it.
MAX_DELIVERIES = 13
PROGRESS_INTERVAL_S = 0.1  # at most ten progress events a second per job
IDLE_POLL_S = 1.0  # with nothing in hand, wait this long at the dispatcher for a job
FILL_RETRY_S = 0.005  # a batch filling asks the dispatcher again this soon
NO_DISPATCHER_RETRY_S = 0.1
MAX_INPUT_PIXELS = 4096 * 4096  # a source image or mask larger than this is refused
# A batch is stopped once its time per image passes its plans' budget by this much: quota
# priced it within the budget, so only a worker far slower than measured gets here.
OVER_BUDGET_FACTOR = 2.0
OVER_BUDGET_SLACK_S = 2.0


class BadInput(Exception):
    """A job's source image or mask is missing or unreadable: retrying cannot help."""


class Attempts:
    """Renders started per request, in a JetStream key-value bucket the fleet shares. The
    count goes up before a render starts, so a worker that dies mid-render uses up an
    attempt; a job handed back unstarted (drain, heat) does not, unlike JetStream's
    delivery count."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def start(self, job: RenderRequested) -> int:
        """Count a render of `job` starting; return which attempt it is (1, 2, …)."""
        key = f"{job.user_id}.{job.request_id}"
        try:
            started = int((await self.kv.get(key)).value or b"0")
        except nats.js.errors.KeyNotFoundError:
            started = 0
        await self.kv.put(key, str(started + 1).encode())
        return started + 1


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
        self.store = store
        self.renderer = renderer
        self.worker_id = worker_id
        self.queue = queue
        self.guard = guard
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.max_side, self.max_steps = max_side, max_steps
        # Tell JetStream well before `ack_wait` that the jobs in hand are being worked on.
        self.in_progress_s = min(10.0, queue.ack_wait_s / 3)
        self.throughput = Throughput()
        self.clock = cost.StepClock()  # seconds per image-step by size: quota prices requests by it
        self._rendering: tuple[list[RenderRequested], datetime | None] = ([], None)  # the batch now, since
        self.held: list[Received] = []  # claimed, not yet in a batch
        self.cancelled: set[str] = set()  # "<user>.<request>" seen on the cancel subject
        self._queued_ms: dict[str, float] = {}  # request → from its request to its batch's start
        self._finishing: asyncio.Future | None = None  # the last batch's stores and reports
        self._storing: set[int] = set()  # the jobs (by id()) whose image is being stored

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
        self.cancelled.add(f"{user_id}.{request_id}")

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                limit = self.guard.batch_limit()
                if limit == 0:  # too hot: take nothing new until it cools; cooler workers take what we hold
                    await self._hand_back()
                    await sleep_unless_stopped(stop, IDLE_POLL_S)
                    continue
                try:
                    batch = await self._next_batch(limit, stop)
                    if batch:
                        await self._run_batch(batch)
                except nats.errors.Error as error:
                    # What was not acked, JetStream hands out again.
                    log.warning("bus error, jobs will be redelivered: %s", error)
                    await sleep_unless_stopped(stop, IDLE_POLL_S)
        finally:
            try:
                await self.finish_previous()
            except nats.errors.Error as error:
                log.warning("bus error, jobs will be redelivered: %s", error)
            await self._hand_back()

    # -- intake -----------------------------------------------------------------------------

    async def _next_batch(self, limit: int, stop: asyncio.Event) -> list[Received]:
        """Up to `limit` compatible jobs: as soon as that many are here, once the dispatcher
        holds no more of their kind (an idle fleet does not wait for company that will not
        come), or once the oldest has waited `max_wait_s` for company."""
        first_at: float | None = None
        while not stop.is_set():
            room = limit - len(self.held)  # never hold more than one batch's worth
            more_queued = False
            if room > 0 and self.held:
                await self._take(await self.queue.claim(room, batch_key(self.held[0].event)))
                more_queued = self.queue.more  # more of its kind wait: the batch may fill
            if not self.held:
                first_at = None
                await self.finish_previous()  # nothing to render meanwhile
                asked = time.monotonic()
                await self._take(await self.queue.claim(limit, wait_s=IDLE_POLL_S))  # waits for a job
                more_queued = self.queue.more
                if not self.held:
                    if time.monotonic() - asked < IDLE_POLL_S / 2:  # no dispatcher (yet): one starts within seconds
                        await sleep_unless_stopped(stop, NO_DISPATCHER_RETRY_S)
                    continue
            first_at = first_at or time.monotonic()
            key = batch_key(self.held[0].event)
            group = [item for item in self.held if batch_key(item.event) == key][:limit]
            waited = time.monotonic() - first_at
            if len(group) >= limit or waited >= self.max_wait_s or not more_queued:
                self.held = [item for item in self.held if item not in group]
                return group
            await asyncio.sleep(FILL_RETRY_S)  # another worker took them first; ask again
        return []

    async def _take(self, claimed: list) -> None:
        """Hold the claimed jobs that are jobs (junk goes to the dead letters)."""
        self.held += await consuming.checked(
            self.bus, claimed, subjects.RENDER_JOBS, (RenderRequested,), MAX_DELIVERIES
        )

    async def _hand_back(self) -> None:
        """Draining or too hot: jobs claimed but not started go back to the queue at once."""
        for item in self.held:
            try:
                await item.msg.nak()
            except nats.errors.Error:
                pass  # JetStream redelivers it after ack_wait anyway
        if self.held:
            log.info("handed back %d jobs", len(self.held))
        self.held = []

    # -- one batch --------------------------------------------------------------------------

    async def _run_batch(self, batch: list[Received]) -> None:
        started = utcnow()
        try:
            for item in batch:
                self._trace_queue_wait(item, started)
                item.span = self.bus.span(item.event, item.msg)
                self._queued_ms[item.event.request_id] = self._record_queue_wait(item.event, started) * 1000
            settled = await asyncio.gather(*(self._settled_before(item) for item in batch))
            todo = [item for item, done in zip(batch, settled, strict=True) if not done]
            sources, masks, todo = await self._inputs(todo)
            attempts, todo = await self._starting(todo)
            if todo:
                await self._render_and_store(todo, sources, masks, attempts)
        finally:
            for item in batch:
                if id(item) not in self._storing:
                    _end(item.span)  # (a job being stored ends its span when stored)

    @staticmethod
    def _record_queue_wait(job: RenderRequested, started: datetime) -> float:
        """Record in the queue-wait histogram how long the job waited for a GPU, from
        context's request to its batch's start; return it in seconds (for its outcome)."""
        waited_s = (started - as_utc(job.requested_at)).total_seconds()
        metrics.queue_wait_seconds.record(max(0.0, waited_s), {"tier": job.tier})  # (clocks differ a little)
        return waited_s

    def _trace_queue_wait(self, item: Received, started: datetime) -> None:
        """The time the job waited for a GPU, as a span of its own in the request's trace:
        from context's request to the start of the batch that takes it."""
        job: RenderRequested = item.event
        wait = self.bus.tracer.start_span(
            "render queue wait",
            context=context_from_headers(item.msg.headers),
            start_time=_ns(job.requested_at),
            attributes={"kiln.request_id": job.request_id, "kiln.tier": job.tier, "kiln.worker_id": self.worker_id},
        )
        wait.end(end_time=_ns(started))

    async def _settled_before(self, item: Received) -> bool:
        """A job whose image is stored (a redelivery) or that was cancelled is settled
        without rendering."""
        job: RenderRequested = item.event
        render_ms = await self._stored_render_ms(subjects.image_key(job.user_id, job.request_id))
        if render_ms is not None:
            await self._complete(item, render_ms)
            return True
        if await self._is_cancelled(job):
            await self._fail(item, "cancelled", "cancelled before it was rendered")
            return True
        return False

    async def _inputs(self, todo: list[Received]) -> tuple[list, list, list[Received]]:
        """The source image (and mask) each edit starts from; a job whose input is missing
        fails as invalid."""
        sources, masks, ready = [], [], []
        for item in todo:
            job: RenderRequested = item.event
            try:
                self._check_job(job)
                source = await self._image(job.source_key) if job.mode != "text" else None
                mask = await self._image(job.mask_key) if job.mode == "inpaint" else None
            except BadInput as error:
                await self._fail(item, "invalid", str(error))
                continue
            sources.append(source)
            masks.append(mask)
            ready.append(item)
        return sources, masks, ready

    def _check_job(self, job: RenderRequested) -> None:
        """Context composed the job within the limits; render checks again, so that a job
        from anywhere else (a compromised service) cannot hold a GPU or read another's image."""
        if max(job.width, job.height) > self.max_side or min(job.width, job.height) < MIN_SIDE:
            raise BadInput(f"{job.width}×{job.height} is outside {MIN_SIDE}..{self.max_side} a side")
        if not 1 <= job.steps <= self.max_steps:
            raise BadInput(f"{job.steps} steps is outside 1..{self.max_steps}")
        if job.source_key is not None and not job.source_key.startswith(f"{job.user_id}/"):
            raise BadInput(f"the source image {job.source_key!r} is not {job.user_id}'s")

    async def _starting(self, todo: list[Received]) -> tuple[dict[str, int], list[Received]]:
        """Count each render starting; a job that has started RENDER_ATTEMPTS times
        before (its worker died each time) ends as failed instead."""
        attempts, ready = {}, []
        started = await asyncio.gather(*(self.attempts.start(item.event) for item in todo))
        for item, attempt in zip(todo, started, strict=True):
            if attempt > RENDER_ATTEMPTS:
                why = f"not finished in {RENDER_ATTEMPTS} renders"
                mark_failed(item.span, why)
                await consuming.give_up(self.bus, item.event, item.msg, why)
                continue
            attempts[item.event.request_id] = attempt
            ready.append(item)
        return attempts, ready

    async def _render_and_store(
        self, todo: list[Received], sources: list, masks: list, attempts: dict[str, int]
    ) -> None:
        try:
            failpoint("render.job")  # tests: a render that fails every time, or a worker that dies
            with self._batch_span(todo) as batch_span:
                pngs, render_ms = await self._render(todo, sources, masks, batch_span)
        except Cancelled as stopped:
            for item in todo:
                await self._fail(item, "cancelled", str(stopped))
            return
        except OverBudget as stopped:
            for item in todo:
                await self._fail(item, "too_costly", str(stopped))
            return
        except ValueError as error:  # the pipeline rejected a job: find which, fail only it
            if len(todo) > 1:
                for index, item in enumerate(todo):
                    await self._render_and_store([item], sources[index : index + 1], masks[index : index + 1], attempts)
            else:
                await self._fail(todo[0], "invalid", str(error))
            return
        except Exception as error:  # noqa: BLE001
            if _out_of_memory(error) and len(todo) > 1:  # smaller batches may fit: halves, down to one job
                log.warning("a batch of %d ran out of memory (%s); rendering it in halves", len(todo), error)
                half = len(todo) // 2
                for part in (slice(0, half), slice(half, None)):
                    await self._render_and_store(todo[part], sources[part], masks[part], attempts)
                return
            # Anything else (a driver error, a bug, one job out of memory): retried with
            # back-off, and after its last attempt the request ends as failed.
            for item in todo:
                record_failure(item.span, error)
                await consuming.retry_or_give_up(
                    self.bus, item, error, attempts[item.event.request_id], RENDER_ATTEMPTS
                )
            return
        metrics.batch_sizes.record(len(todo))
        metrics.render_seconds.record(render_ms / 1000)
        first: RenderRequested = todo[0].event
        self.clock.record(first.width, first.height, len(todo), first.steps, render_ms / 1000)
        # Store and report while the next batch renders: the images are in hand, and the
        # bus's disk writes need no CPU. One batch finishes at a time.
        self._storing.update(id(item) for item in todo)
        finishing = asyncio.gather(
            *(self._store(item, png, render_ms, len(todo)) for item, png in zip(todo, pngs, strict=True))
        )
        await self.finish_previous()
        self._finishing = asyncio.ensure_future(finishing)

    async def finish_previous(self) -> None:
        """Wait until the previous batch's images are stored and its jobs acked."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            await finishing

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

    async def _store(self, item: Received, png: bytes, render_ms: float, batch_size: int) -> None:
        job: RenderRequested = item.event
        try:
            if self._cancel_key(job) in self.cancelled:  # its batch went on without it
                await self._fail(item, "cancelled", "cancelled while its batch rendered; not stored")
                return
            meta = ObjectMeta(description=json.dumps({"render_ms": render_ms, "batch": batch_size}))
            with self.bus.tracer.start_as_current_span(
                "image store put",
                context=trace.set_span_in_context(item.span),
                kind=trace.SpanKind.CLIENT,  # a call to the object store
                attributes={"kiln.bytes": len(png), "kiln.bucket": subjects.IMAGE_BUCKET},
            ):
                await self.store.put(subjects.image_key(job.user_id, job.request_id), png, meta=meta)
            self.throughput.add()
            await self._complete(item, render_ms, batch_size=batch_size)
        finally:
            self._storing.discard(id(item))
            _end(item.span)

    async def _render(
        self, todo: list[Received], sources: list, masks: list, batch_span: trace.Span
    ) -> tuple[list[bytes], float]:
        loop = asyncio.get_running_loop()
        jobs: list[RenderRequested] = [item.event for item in todo]
        last_sent = 0.0
        budgets = [job.budget_s for job in jobs]
        # The batch may run until its most generous plan's budget (per image) is far passed.
        budget_s = None if None in budgets else max(budgets)  # type: ignore[type-var]
        render_started = time.monotonic()
        for item in todo:
            context = batch_span.get_span_context()
            item.span.set_attributes(
                {
                    "kiln.batch_size": len(todo),
                    "kiln.batch.trace_id": format(context.trace_id, "032x"),
                    "kiln.batch.span_id": format(context.span_id, "016x"),
                }
            )

        def on_step(step: int, total: int) -> None:
            # Runs on the render thread: hand the publishing to the event loop.
            nonlocal last_sent
            batch_span.add_event("step", {"kiln.step": step})  # the step timings
            failpoint("render.step")  # tests: a worker slower than measured (`render.step:slow`)
            if all(self._cancel_key(job) in self.cancelled for job in jobs):
                raise Cancelled(step, total)
            now = time.monotonic()
            per_image_s = (now - render_started) / len(jobs)
            if budget_s is not None and per_image_s > budget_s * OVER_BUDGET_FACTOR + OVER_BUDGET_SLACK_S:
                raise OverBudget(step, total, per_image_s, budget_s)
            if step < total and now - last_sent < PROGRESS_INTERVAL_S:
                return
            last_sent = now
            for item in todo:
                job = item.event
                progress = RenderProgress(
                    request_id=job.request_id,
                    user_id=job.user_id,
                    conversation_id=job.conversation_id,
                    step=step,
                    total_steps=total,
                )
                subject = subjects.render_progress(job.user_id, job.request_id)
                # In the job's own trace, not the batch's (this thread runs in the batch span).
                asyncio.run_coroutine_threadsafe(self.bus.publish_plain(subject, progress, span=item.span), loop)

        if failpoints.armed("render.batch:oom") and len(jobs) > 2:  # tests: a device that fits 2 at once
            raise MemoryError(f"failpoint: out of memory for a batch of {len(jobs)}")
        rendering = asyncio.ensure_future(asyncio.to_thread(self.renderer.render_batch, jobs, on_step, sources, masks))
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
            for item in [*todo, *self.held]:
                try:
                    await item.msg.in_progress()
                except nats.errors.Error as error:
                    log.warning("could not extend job %s: %s", item.event.request_id, error)

    # -- inputs and outcomes ----------------------------------------------------------------

    async def _image(self, key: str | None) -> Image.Image:
        try:
            stored = await self.store.get(key or "")
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            raise BadInput(f"no stored image {key!r} to edit") from None
        try:
            image = Image.open(io.BytesIO(stored.data or b""))
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise BadInput(f"{key!r} is {image.width}×{image.height}, larger than an input may be")
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise BadInput(f"{key!r} is not an image: {error}") from None
        return image

    async def _stored_render_ms(self, key: str) -> float | None:
        try:
            info = await self.store.get_info(key)
        except nats.js.errors.ObjectNotFoundError:
            return None
        return float(json.loads(info.description or "{}").get("render_ms", 0.0))

    @staticmethod
    def _cancel_key(job: RenderRequested) -> str:
        return f"{job.user_id}.{job.request_id}"

    async def _is_cancelled(self, job: RenderRequested) -> bool:
        if self._cancel_key(job) in self.cancelled:
            return True
        cancel = subjects.render_cancel(job.user_id, job.request_id)
        return await self.bus.last_message(subjects.RENDER_CANCELS, cancel) is not None

    async def _complete(self, item: Received, render_ms: float, batch_size: int = 1) -> None:
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
            queued_ms=self._queued_ms.pop(job.request_id, None),
            prompt=job.prompt,
            composition=job.composition,
        )
        await self._report(item, completed)

    async def _fail(self, item: Received, reason: str, detail: str) -> None:
        job: RenderRequested = item.event
        log.warning("job %s failed for good: %s %s", job.request_id, reason, detail)
        if reason != "cancelled":  # a cancel is what the user asked for, not a failure
            mark_failed(item.span, f"{reason}: {detail}")
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


def _out_of_memory(error: Exception) -> bool:
    """A device (or host) out of memory: torch.OutOfMemoryError, or the RuntimeError an
    older torch or another backend raises."""
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def _ns(moment: datetime) -> int:
    """A timestamp as OpenTelemetry takes it: nanoseconds since the epoch."""
    return int(as_utc(moment).timestamp() * 1e9)


def _end(span: trace.Span) -> None:
    """End a job's span once, whichever path finishes the job first."""
    if span.is_recording():
        span.end()
