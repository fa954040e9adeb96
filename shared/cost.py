"""What a render costs: seconds of a worker's time per image, priced from what the workers
measured. Quota prices a request at admission (and refuses one over its plan's budget),
render's queue reporter estimates each waiting job's wait, render stops a job that runs far
past its budget.

A worker measures seconds per image-step for each size it renders (`StepClock`) and sends
its table in its heartbeat, keyed by size ("32x32"). A size nobody has measured is priced
from the nearest measured one: larger pictures cost more than their pixels (attention
grows faster than the pixel count: ×7 to ×9 per doubling of the side on a CPU, for ×4 the
pixels), so up is scaled by pixels^1.5, down by pixels (a safe overestimate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

UP_EXPONENT = 1.5
SMOOTHING = 0.3  # a new measurement's weight in the running figure
MAX_SIZES = 32  # sizes a worker keeps figures for


def size_key(width: int, height: int) -> str:
    return f"{width}x{height}"


def _pixels(key: str) -> int:
    width, _, height = key.partition("x")
    return int(width) * int(height)


def step_seconds(table: Mapping[str, float], width: int, height: int) -> float | None:
    """Seconds per image-step at `width`×`height` from a table of measured sizes; None when
    nothing is measured."""
    if not table:
        return None
    key = size_key(width, height)
    if key in table:
        return table[key]
    pixels = width * height
    nearest = min(table, key=lambda measured: abs(_pixels(measured) - pixels))
    ratio = pixels / _pixels(nearest)
    return table[nearest] * (ratio**UP_EXPONENT if ratio > 1 else ratio)


def estimate_s(table: Mapping[str, float], width: int, height: int, steps: int) -> float | None:
    """Seconds of a worker's time for one image; None when nothing is measured."""
    per_step = step_seconds(table, width, height)
    return None if per_step is None else per_step * steps


def fleet_table(tables: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The fleet's figure per size: the mean over the workers that measured it."""
    sums: dict[str, list[float]] = {}
    for table in tables:
        for key, seconds in table.items():
            sums.setdefault(key, []).append(seconds)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def what_fits(
    table: Mapping[str, float], width: int, height: int, steps: int, budget_s: float, sides: Iterable[int]
) -> str:
    """A suggestion that fits `budget_s`, as CLI options: a smaller side at the same steps,
    else fewer steps at the same size, else the smallest side with the steps that fit;
    '' when nothing does (or nothing is measured)."""

    def steps_that_fit(side_w: int, side_h: int) -> int:
        per_step = step_seconds(table, side_w, side_h)
        return int(budget_s / per_step) if per_step else 0

    smaller = sorted((s for s in sides if s * s < width * height), reverse=True)
    for side in smaller:
        if steps_that_fit(side, side) >= steps:
            return f"--size {side}"
    if steps_that_fit(width, height) >= 1:
        return f"--steps {min(steps, steps_that_fit(width, height))}"
    if smaller and steps_that_fit(smaller[-1], smaller[-1]) >= 1:
        return f"--size {smaller[-1]} --steps {steps_that_fit(smaller[-1], smaller[-1])}"
    return ""


def duration(seconds: float) -> str:
    """A time a person reads at a glance: '0.6 s', '40 s', '8 min'."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


class StepClock:
    """A worker's running figures: seconds per image-step for each size it rendered."""

    def __init__(self) -> None:
        self.table: dict[str, float] = {}

    def record(self, width: int, height: int, images: int, steps: int, seconds: float) -> None:
        if images < 1 or steps < 1 or seconds <= 0:
            return
        key, measured = size_key(width, height), seconds / (images * steps)
        before = self.table.pop(key, None)  # re-inserted last: the dict stays newest-last
        self.table[key] = measured if before is None else before + SMOOTHING * (measured - before)
        while len(self.table) > MAX_SIZES:
            del self.table[next(iter(self.table))]  # the size not rendered for longest
