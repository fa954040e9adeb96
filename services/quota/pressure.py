"""Fleet pressure: the render workers' heartbeats in, one level out.

`level_of` is pure (tested on its own); `FleetMonitor` keeps the latest heartbeat of each
worker from plain NATS and forgets a worker that has gone quiet.
"""

from __future__ import annotations

import logging
import time

import msgspec

from services.quota.plans import PRESSURE_LEVELS, PressureRules
from shared.events import Pressure, WorkerHeartbeat, decode_json

log = logging.getLogger("kiln.quota.pressure")

SIGNALS = ("queue_depth", "gpu_temperature_c", "gpu_utilisation", "cpu_load")


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

    def hear(self, data: bytes, subject: str) -> None:
        """A heartbeat as it came off the bus."""
        try:
            beat = decode_json(data, WorkerHeartbeat)
        except msgspec.DecodeError as error:
            log.warning("ignoring a heartbeat that does not decode on %s: %s", subject, error)
            return
        self.record(beat)

    def record(self, beat: WorkerHeartbeat, received: float | None = None) -> None:
        self._latest[beat.worker_id] = (received if received is not None else time.monotonic(), beat)

    def level(self) -> tuple[Pressure, str]:
        """Also read by the metrics endpoint's thread: it works on a copy (copying a dict
        is one step for the interpreter) and removes with `pop`."""
        cutoff = time.monotonic() - self.rules.stale_after_s
        latest = dict(self._latest)
        for worker in [w for w, (at, _) in latest.items() if at < cutoff]:
            self._latest.pop(worker, None)  # gone quiet: stopped, or crashed
            del latest[worker]
        live = [beat for _, beat in latest.values()]
        level, why = level_of(live, self.rules)
        if level != self._last_level:
            log.warning("fleet pressure %s -> %s (%s)", self._last_level, level, why)
            self._last_level = level
        return level, why
