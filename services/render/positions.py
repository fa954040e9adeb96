"""While a job waits, its owner sees its place in the queue and an estimate of the wait.

One worker of the fleet reports: the one with the smallest id among the workers heard from
in the last few seconds, so the fleet needs no coordinator and a dead reporter is replaced
within seconds. Once a second it reads the jobs no worker has taken yet, puts them in the
order the fair queue will take them, and publishes `RenderProgress(state="queued")` with
the job's place and an estimate of its wait on each job's progress subject. Progress is
plain NATS: a missed report costs nothing.

The estimate prices each job ahead by the workers' measured seconds per image-step for its
size (shared.cost), adds what the batches in hand still need, and shares it over the live
workers. (It ignores batching: where a batch costs less than its images one by one, as on
a GPU, it errs long.)
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
import nats.js.errors

from services.render.queue import JobQueue, Waiting, fair_order
from shared import cost, subjects
from shared.bus import Bus
from shared.events import RenderProgress, RenderRequested, WorkerHeartbeat, decode_json
from shared.service import sleep_unless_stopped

log = logging.getLogger("kiln.render.positions")

REPORT_S = 1.0
FRESH_S = 3.0  # a worker not heard from for this long is gone
MAX_REPORTED = 500  # jobs per report: beyond this, "far back" is all a user needs to know


class QueueReporter:
    def __init__(self, bus: Bus, queue: JobQueue, worker_id: str) -> None:
        self.bus = bus
        self.queue = queue
        self.worker_id = worker_id
        self.heard: dict[str, tuple[float, WorkerHeartbeat]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.is_reporter():
                try:
                    await self.report()
                except (nats.errors.Error, nats.js.errors.Error) as error:
                    log.warning("queue positions not reported: %s", error)
            await sleep_unless_stopped(stop, REPORT_S)

    def hear(self, data: bytes) -> None:
        """A worker's heartbeat: who else is reporting, and how fast the fleet draws."""
        try:
            beat = decode_json(data, WorkerHeartbeat)
        except msgspec.DecodeError:
            return
        self.heard[beat.worker_id] = (time.monotonic(), beat)
        # Forget workers long gone, so the map holds the live fleet only.
        cutoff = time.monotonic() - 10 * FRESH_S
        for worker in [w for w, (at, _) in self.heard.items() if at < cutoff]:
            del self.heard[worker]

    def _fresh(self) -> list[WorkerHeartbeat]:
        cutoff = time.monotonic() - FRESH_S
        return [beat for at, beat in self.heard.values() if at >= cutoff]

    def is_reporter(self) -> bool:
        return min([self.worker_id, *(beat.worker_id for beat in self._fresh())]) == self.worker_id

    async def report(self) -> None:
        waiting = await self.queue.waiting()
        fleet = self._fresh()
        table = cost.fleet_table(beat.step_seconds for beat in fleet)
        workers = max(1, len(fleet))
        ahead_s = sum(beat.rendering_left_s for beat in fleet)  # the batches in hand
        order = fair_order(waiting, self.queue.last_served, MAX_REPORTED)
        deepest = {w.consumer: (w, index) for w, index in order}  # later entries win: the last index
        jobs = await self._jobs(list(deepest.values()))
        for place, (w, index) in enumerate(order, start=1):
            if index >= len(jobs[w.consumer]):
                continue  # taken meanwhile
            job = jobs[w.consumer][index]
            queued = RenderProgress(
                request_id=job.request_id,
                user_id=job.user_id,
                conversation_id=job.conversation_id,
                step=0,
                total_steps=job.steps,
                state="queued",
                queue_position=place,
                eta_s=round(ahead_s / workers, 1) if table else None,
            )
            await self.bus.publish_plain(subjects.render_progress(job.user_id, job.request_id), queued)
            ahead_s += cost.estimate_s(table, job.width, job.height, job.steps) or 0.0

    async def _jobs(self, wanted: list[tuple[Waiting, int]]) -> dict[str, list[RenderRequested]]:
        """Each user's first waiting jobs, up to the index wanted, in stream order (plain
        reads: nothing is claimed)."""
        jobs: dict[str, list[RenderRequested]] = {}
        for w, last_index in wanted:
            subject, seq, found = subjects.render_job(w.tier, w.user_id), w.after_seq + 1, []
            while len(found) <= last_index:
                stored = await self.bus.next_stored(subjects.RENDER_JOBS, subject, seq)
                if stored is None:
                    break
                try:
                    found.append(stored.event())
                except msgspec.DecodeError:
                    pass  # the worker that claims it dead-letters it
                seq = stored.seq + 1
            jobs[w.consumer] = [job for job in found if isinstance(job, RenderRequested)]
        return jobs
