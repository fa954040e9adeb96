"""Who else is in the render fleet, from the heartbeats every worker hears: how fast it
draws (for queue estimates) and which worker hands out the queue's jobs.

The fleet needs no coordinator to pick its dispatcher. A worker that dispatches says so in
its heartbeat, and keeps the role while it lives; when none does (the first start, or the
dispatcher died or left), the live worker with the smallest id takes it. A newcomer listens
for a few heartbeats before it may take the role, so it does not start a second
dispatcher beside one it has not heard yet, unless it asked and no dispatcher answered. Two dispatchers at once (a partition, a slow
heartbeat) cost fairness for a moment, never a job: JetStream hands each job to one of them.
"""

from __future__ import annotations

import time

import msgspec

from shared.events import WorkerHeartbeat, decode_json

FRESH_S = 3.0  # a worker not heard from for this long is gone
LISTEN_FIRST_S = 2.5  # a worker hears the fleet this long before it may take the dispatcher's role


class Fleet:
    def __init__(self, worker_id: str, clock=time.monotonic) -> None:
        self.worker_id = worker_id
        self.clock = clock
        self.started = clock()
        self.nobody_answered = False  # a claim found no dispatcher: no need to listen longer
        self.heard: dict[str, tuple[float, WorkerHeartbeat]] = {}

    def hear(self, data: bytes) -> None:
        """A worker's heartbeat (this worker's own included)."""
        try:
            beat = decode_json(data, WorkerHeartbeat)
        except msgspec.DecodeError:
            return
        if beat.leaving:
            self.heard.pop(beat.worker_id, None)
        else:
            self.heard[beat.worker_id] = (self.clock(), beat)
        # Forget workers long gone, so the map holds the live fleet only.
        cutoff = self.clock() - 10 * FRESH_S
        for worker in [w for w, (at, _) in self.heard.items() if at < cutoff]:
            del self.heard[worker]

    def live(self) -> list[WorkerHeartbeat]:
        """The workers heard from in the last FRESH_S seconds."""
        cutoff = self.clock() - FRESH_S
        return [beat for at, beat in self.heard.values() if at >= cutoff]

    def should_dispatch(self, dispatching_now: bool) -> bool:
        """Whether this worker should be the fleet's dispatcher (`dispatching_now`: it is)."""
        others = [beat for beat in self.live() if beat.worker_id != self.worker_id]
        dispatchers = [beat.worker_id for beat in others if beat.dispatching]
        if dispatching_now:
            return not dispatchers or self.worker_id < min(dispatchers)  # of two, the smaller stays
        if dispatchers or (self.clock() - self.started < LISTEN_FIRST_S and not self.nobody_answered):
            return False
        return self.worker_id < min((beat.worker_id for beat in others), default="\uffff")
