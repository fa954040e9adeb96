"""While a job waits, its owner sees its place in the queue and an estimate of the wait.

The dispatcher (dispatch.py) knows the order in which it will hand out the jobs it holds;
once a second it publishes `RenderProgress(state="queued")` with the place and an estimate
of the wait on the progress subject of each of the first MAX_REPORTED. Progress is plain
NATS: a missed report costs nothing. (Jobs beyond the dispatcher's window are not told a
place until they enter it.)

The estimate prices each job ahead by the workers' measured seconds per image-step for its
size (shared.cost), adds what the batches in hand still need, and shares it over the live
workers. (It ignores batching: where a batch costs less than its images one by one, as on
a GPU, it errs long.)
"""

from __future__ import annotations

from collections.abc import Sequence

from shared import cost, subjects
from shared.bus import Bus
from shared.events import RenderProgress, RenderRequested, WorkerHeartbeat

MAX_REPORTED = 500  # jobs per report: beyond this, "far back" is all a user needs to know


async def report_places(bus: Bus, order: Sequence[RenderRequested], fleet: Sequence[WorkerHeartbeat]) -> None:
    """Tell each job in `order` its place (1, 2, …) and how long it should wait."""
    table = cost.fleet_table(beat.step_seconds for beat in fleet)
    workers = max(1, len(fleet))
    ahead_s = sum(beat.rendering_left_s for beat in fleet)  # the batches in hand
    for place, job in enumerate(order, start=1):
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
        await bus.publish_plain(subjects.render_progress(job.user_id, job.request_id), queued)
        ahead_s += cost.estimate_s(table, job.width, job.height, job.steps) or 0.0
