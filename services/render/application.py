"""The render application: a worker with its queue, thermal guard and heartbeat, and the
dispatcher's role when the fleet gives it that (dispatch.py).

Jobs are not handed to it by a durable consumer of `shared.service`: the fleet's dispatcher
pulls them and hands them out fairly, and the worker claims its own work from it (`work`).
What it hears on plain NATS marks a job cancelled, or tells it who else is in the fleet.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.render.attempts import Attempts
from services.render.dispatch import Dispatcher
from services.render.fleet import Fleet
from services.render.heartbeat import send_heartbeats
from services.render.intake import MAX_DELIVERIES
from services.render.queue import JobQueue
from services.render.status import WorkerStatus
from services.render.thermal import Gpu, ThermalGuard, injected_temperature
from services.render.worker import RenderWorker
from shared import model_card, subjects
from shared.bus import Bus, Message
from shared.consuming import GIVE_UP_MARGIN
from shared.service import CannotStart
from shared.settings import Settings


class Render:
    def __init__(self, bus: Bus, worker: RenderWorker, fleet: Fleet, dispatcher: Dispatcher, gpu: Gpu) -> None:
        self.bus = bus
        self.worker = worker
        self.fleet = fleet
        self.dispatcher = dispatcher
        self.gpu = gpu

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, bus: Bus, *, worker_id: str) -> AsyncIterator[Render]:
        # imports torch: after CUDA_VISIBLE_DEVICES
        from services.render.pipeline import Renderer, on_torch_thread

        renderer = await on_torch_thread(Renderer, settings.model_path, settings.render_threads)
        gpu = Gpu()

        def temperature() -> float | None:
            injected = injected_temperature(settings.inject_gpu_temperature)
            return injected if injected is not None else gpu.read().temperature_c

        guard = ThermalGuard(
            temperature,
            settings.render_max_batch,
            hot_c=settings.gpu_hot_c,
            pause_c=settings.gpu_pause_c,
            resume_c=settings.gpu_resume_c,
        )
        queue = JobQueue(bus, worker_id, ack_wait_s=settings.render_ack_wait_s)
        worker = RenderWorker(
            bus,
            await bus.object_store(subjects.IMAGES),
            renderer,
            worker_id,
            queue,
            guard,
            Attempts(await bus.key_value(subjects.RENDER_ATTEMPTS)),
            max_wait_s=settings.render_max_wait_ms / 1000,
            max_side=settings.render_max_side,
            max_steps=settings.render_max_steps,
        )
        # Priced from its first heartbeat on: a warm-up render at the model's sizes (and
        # its text model's).
        try:
            sides = model_card.load(settings.model_path).offered_sides()
            text_card = model_card.text_card(settings.model_path)
        except model_card.CardError as error:
            raise CannotStart(f"cannot read the model card: {error}") from error
        text_sides = (text_card.sizes or []) if text_card is not None else []
        await on_torch_thread(renderer.warm_up, sides, worker.clock, text_sides=text_sides)
        fleet = Fleet(worker_id)
        dispatcher = Dispatcher(
            bus,
            fleet,
            ack_wait_s=settings.render_ack_wait_s,
            max_deliver=MAX_DELIVERIES + GIVE_UP_MARGIN,
            max_attempts=MAX_DELIVERIES,
            window=settings.render_queue_window,
            shares=dict(settings.render_shares),
        )
        yield cls(bus, worker, fleet, dispatcher, gpu)

    # -- heard on plain NATS
    async def hear_cancel(self, message: Message) -> None:
        user_id = subjects.RENDER_CANCEL.value(message.subject, "user")
        request_id = subjects.RENDER_CANCEL.value(message.subject, "request")
        self.worker.cancel_requested(user_id, request_id)

    async def hear_heartbeat(self, message: Message) -> None:
        self.fleet.hear(message.data)

    # -- loops
    async def work(self, stop: asyncio.Event) -> None:
        await self.worker.run(stop)

    async def send_heartbeats(self, stop: asyncio.Event) -> None:
        await send_heartbeats(self.bus, self._status, self.worker.queue.depth, self.gpu, stop)

    async def dispatch(self, stop: asyncio.Event) -> None:
        await self.dispatcher.run(stop)

    def _status(self) -> WorkerStatus:
        return dataclasses.replace(self.worker.status(), dispatching=self.dispatcher.dispatching)
