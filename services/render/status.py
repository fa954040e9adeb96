"""What a worker says about itself: the snapshot its heartbeat sends, and its throughput.

The worker keeps these; the heartbeat (heartbeat.py) reads them. Neither imports the other.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    device: str
    model: str
    batch_limit: int  # what the thermal guard allows now (0: paused)
    temperature_c: float | None
    images_per_s: float
    rendering: tuple[str, ...] = ()  # the batch in the pipeline now: "<user>/<request>" each
    rendering_since: datetime | None = None
    step_seconds: dict[str, float] = field(default_factory=dict)  # measured, by size: shared.cost
    rendering_left_s: float = 0.0
    dispatching: bool = False  # it hands out the fleet's jobs (dispatch.py)


class Throughput:
    """Images finished in the last minute, as images per second."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._done: deque[float] = deque()

    def add(self) -> None:
        self._done.append(time.monotonic())

    def per_second(self) -> float:
        cutoff = time.monotonic() - self.window_s
        while self._done and self._done[0] < cutoff:
            self._done.popleft()
        return len(self._done) / self.window_s
