"""Fleet pressure: the render workers' heartbeats in, one level out.

`level_of` is pure (tested on its own); `FleetMonitor` keeps the latest heartbeat of each
worker from plain NATS and forgets a worker that has gone quiet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import msgspec

from services.quota.plans import PRESSURE_LEVELS, PressureRules
from shared import cost
from shared.events import Pressure, WorkerHeartbeat, decode_json

log = logging.getLogger("kiln.quota.pressure")

SIGNALS = ("queue_depth", "gpu_temperature_c", "gpu_utilisation", "cpu_load")
EVALUATE_EVERY_S = 1.0


def level_of(heartbeats: list[WorkerHeartbeat], rules: PressureRules) -> tuple[Pressure, str]:
    """The highest level any signal of any worker reaches, and why (for the decision's
    metadata). No live worker means nothing to protect: normal."""
    worst: Pressure = "normal"
    why = "no worker reporting" if not heartbeats else "all signals below thresholds"
    for beat in heartbeats:
        for signal in SIGNALS:
            value = getattr(beat, signal)
            level = getattr(rules, signal).level(value)
            if PRESSURE_LEVELS.index(level) > PRESSURE_LEVELS.index(worst):
                worst, why = level, f"{signal}={value:g} on {beat.worker_id}"
    return worst, why


class FleetMonitor:
    def __init__(self, rules: PressureRules) -> None:
        self.rules = rules
        self._latest: dict[str, tuple[float, WorkerHeartbeat]] = {}
        self._last_level: Pressure = "normal"
        # Since when the signals have reached each level without a break: a level counts
        # only once it has held `hold_s`; it falls at once. Updated with each heartbeat.
        self._reached_since: dict[Pressure, float] = {}
        self._lock = threading.Lock()  # the metrics endpoint's thread reads the level too
        self._evaluated_at = float("-inf")

    def hear(self, data: bytes, subject: str) -> None:
        """A heartbeat as it came off the bus."""
        try:
            beat = decode_json(data, WorkerHeartbeat)
        except msgspec.DecodeError as error:
            log.warning("ignoring a heartbeat that does not decode on %s: %s", subject, error)
            return
        self.record(beat)

    def record(self, beat: WorkerHeartbeat, received: float | None = None) -> None:
        now = received if received is not None else time.monotonic()
        self._latest[beat.worker_id] = (now, beat)
        # So that a level's time held counts from its first heartbeat. Once a second (the
        # heartbeats' pace) is enough, and keeps a large fleet's heartbeats from costing
        # a pass over the whole fleet each.
        if now - self._evaluated_at >= EVALUATE_EVERY_S:
            self.level(now)

    def level(self, now: float | None = None) -> tuple[Pressure, str]:
        """The level the signals have held for `hold_s`, and why."""
        now = time.monotonic() if now is None else now
        self._evaluated_at = now
        with self._lock:
            reached, why = level_of(self._live(now), self.rules)
            held = self._held(reached, now)
        if held != reached:
            since = now - self._reached_since[reached]
            why = f"{reached} for {since:.0f} of the {self.rules.hold_s:g} s it must hold ({why})"
        level = held
        if level != self._last_level:
            log.warning("fleet pressure %s -> %s (%s)", self._last_level, level, why)
            self._last_level = level
        return level, why

    def step_seconds(self) -> dict[str, float]:
        """The live workers' measured seconds per image-step by size (for pricing)."""
        with self._lock:
            live = self._live(time.monotonic())
        return cost.fleet_table(beat.step_seconds for beat in live)

    def _live(self, now: float) -> list[WorkerHeartbeat]:
        cutoff = now - self.rules.stale_after_s
        for worker in [w for w, (at, _) in self._latest.items() if at < cutoff]:
            del self._latest[worker]  # gone quiet: stopped, or crashed
        return [beat for _, beat in self._latest.values()]

    def _held(self, reached: Pressure, now: float) -> Pressure:
        """The highest level reached without a break for `hold_s`."""
        held: Pressure = "normal"
        for level in PRESSURE_LEVELS[1:]:
            if PRESSURE_LEVELS.index(reached) >= PRESSURE_LEVELS.index(level):
                since = self._reached_since.setdefault(level, now)
                if now - since >= self.rules.hold_s:
                    held = level
            else:
                self._reached_since.pop(level, None)
        return held


class Shed:
    """What this quota process shed in the last WINDOW_S seconds: free requests denied for
    capacity or for the tighter rate under pressure, and images degraded (for `kiln status`).
    Counted per second, so that memory stays flat however much is shed (a list of every
    time grew by the whole window's sheds: tens of thousands in an overload soak)."""

    WINDOW_S = 600.0

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        # Per kind, [second, count] pairs, oldest first: at most WINDOW_S + 1 of them.
        self._seconds: dict[str, deque[list[int]]] = {"shed": deque(), "degraded": deque()}

    def record(self, kind: str) -> None:
        second, seconds = int(self.clock()), self._seconds[kind]
        if seconds and seconds[-1][0] == second:
            seconds[-1][1] += 1
        else:
            seconds.append([second, 1])
        self._forget()

    def counts(self) -> dict[str, int]:
        self._forget()
        return {kind: sum(count for _, count in seconds) for kind, seconds in self._seconds.items()}

    def _forget(self) -> None:
        cutoff = self.clock() - self.WINDOW_S
        for seconds in self._seconds.values():
            while seconds and seconds[0][0] < cutoff:
                seconds.popleft()
