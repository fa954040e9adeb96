"""The render worker: pull a job, render it, store the PNG, report the outcome.

A job is acked only after its image is stored and `RenderCompleted` published. If the
worker dies first, JetStream hands the job to another worker; the object store is checked
before rendering, so a job whose image was already stored is not drawn twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ObjectMeta
from nats.js.object_store import ObjectStore

from services.render.pipeline import Renderer
from services.render.telemetry import Throughput
from shared import subjects
from shared.bus import Bus
from shared.failpoints import failpoint
from shared.events import RenderCompleted, RenderFailed, RenderProgress, RenderRequested

log = logging.getLogger("kiln.render")

RENDER_ATTEMPTS = 3  # tries per job before it fails for good
PROGRESS_INTERVAL_S = 0.1  # at most ten progress events a second per job
HEARTBEAT_S = 10.0  # tells JetStream the job is still being worked on


class RenderWorker:
    def __init__(self, bus: Bus, store: ObjectStore, renderer: Renderer, worker_id: str) -> None:
        self.bus = bus
        self.store = store
        self.renderer = renderer
        self.worker_id = worker_id
        self.throughput = Throughput()

    async def handle_job(self, event: RenderRequested, msg: Msg) -> None:
        key = subjects.image_key(event.user_id, event.request_id)

        # 1. A redelivered job whose image is already stored needs no second render.
        render_ms = await self._stored_render_ms(key)
        if render_ms is None:
            # 2. Render, keeping the job alive in JetStream while it runs. Any other error
            #    reaches the bus, which retries the job and after RENDER_ATTEMPTS (crashed
            #    workers included) ends the request as failed.
            failpoint("render.job")  # tests: a render that fails every time
            try:
                png, render_ms = await self._render(event, msg)
            except ValueError as error:  # the pipeline rejected the job: retrying cannot help
                await self._fail(event, "invalid", str(error))
                return
            # 3. Store the PNG; events carry only its key.
            meta = ObjectMeta(description=json.dumps({"render_ms": render_ms}))
            await self.store.put(key, png, meta=meta)
            self.throughput.add()

        # 4. Report.
        completed = RenderCompleted(
            request_id=event.request_id,
            user_id=event.user_id,
            conversation_id=event.conversation_id,
            image_key=key,
            width=event.width,
            height=event.height,
            seed=event.seed,
            render_ms=render_ms,
            worker_id=self.worker_id,
        )
        await self._report(completed)

    async def _stored_render_ms(self, key: str) -> float | None:
        try:
            info = await self.store.get_info(key)
        except nats.js.errors.ObjectNotFoundError:
            return None
        return float(json.loads(info.description or "{}").get("render_ms", 0.0))

    async def _render(self, job: RenderRequested, msg: Msg) -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        last_sent = 0.0

        def on_step(step: int, total: int) -> None:
            # Runs on the render thread: hand the publish to the event loop.
            nonlocal last_sent
            now = time.monotonic()
            if step < total and now - last_sent < PROGRESS_INTERVAL_S:
                return
            last_sent = now
            progress = RenderProgress(
                request_id=job.request_id,
                user_id=job.user_id,
                conversation_id=job.conversation_id,
                step=step,
                total_steps=total,
            )
            subject = subjects.render_progress(job.user_id, job.request_id)
            asyncio.run_coroutine_threadsafe(self.bus.announce(subject, progress), loop)

        rendering = asyncio.ensure_future(asyncio.to_thread(self.renderer.render, job, on_step))
        while True:
            done, _ = await asyncio.wait({rendering}, timeout=HEARTBEAT_S)
            if done:
                return rendering.result()
            try:
                await msg.in_progress()
            except nats.errors.Error as error:
                # Keep waiting for the render in hand: leaving now would start a second
                # render on the same pipeline while the first still runs.
                log.warning("could not extend job %s: %s", job.request_id, error)

    async def _fail(self, job: RenderRequested, reason: str, detail: str) -> None:
        log.warning("job %s failed for good: %s %s", job.request_id, reason, detail)
        failed = RenderFailed(
            request_id=job.request_id,
            user_id=job.user_id,
            conversation_id=job.conversation_id,
            reason=reason,
            detail=detail,
            worker_id=self.worker_id,
        )
        await self._report(failed)

    async def _report(self, outcome: RenderCompleted | RenderFailed) -> None:
        # One outcome per job, ever: completed and failed share the subject.
        await self.bus.publish(
            subjects.render_event(outcome.user_id, outcome.request_id), outcome, first_on_subject=True
        )
