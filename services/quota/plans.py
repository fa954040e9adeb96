"""Plans and load-shedding rules, read from a TOML file (`plans.toml` beside this module,
or the file KILN_PLANS names). A mistake in the file stops the service at start with a
message naming the key, not at the first request."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from shared.events import Pressure

DEFAULT_PLAN = "free"
PRESSURE_LEVELS: tuple[Pressure, ...] = ("normal", "elevated", "critical")


class Plan(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One plan's limits. Recorded with every decision, so replay needs no config."""

    tier: Literal["paid", "free"]
    daily_limit: int
    burst: int
    per_hour: float
    soft_cap: int = 0
    budget_s: float = 0.0  # seconds of a worker's time one image may take; 0 = no budget
    max_active: int = 0  # requests granted and not yet ended, at once; 0 = no limit

    def __post_init__(self) -> None:
        if self.daily_limit < 0 or self.burst < 1 or self.per_hour <= 0 or self.soft_cap < 0 or self.budget_s < 0:
            raise ValueError("need daily_limit >= 0, burst >= 1, per_hour > 0, soft_cap >= 0, budget_s >= 0")
        if self.max_active < 0:
            raise ValueError("need max_active >= 0 (0: no limit)")
        # Kept below 10^15: larger floats come back from JSONB as integers, which would
        # change the logged decision's canonical form (and its hash).
        if max(self.daily_limit, self.burst, self.per_hour, self.soft_cap, self.budget_s) >= 1e15:
            raise ValueError("limits must be below 10^15 (for an unlimited plan, use 10^12)")


class Thresholds(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    elevated: float | None = None
    critical: float | None = None

    def level(self, value: float | None) -> Pressure:
        if value is None:
            return "normal"
        if self.critical is not None and value >= self.critical:
            return "critical"
        if self.elevated is not None and value >= self.elevated:
            return "elevated"
        return "normal"


class PressureRules(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    stale_after_s: float = 5.0
    hold_s: float = 0.0  # a level is reached only after the signals hold it this long
    queue_depth: Thresholds = Thresholds()
    gpu_temperature_c: Thresholds = Thresholds()
    gpu_utilisation: Thresholds = Thresholds()
    cpu_load: Thresholds = Thresholds()


class Shedding(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    elevated_burst: int = 1
    elevated_per_hour: float = 6.0
    elevated_max_steps: int = 0  # free images render with at most this many steps while elevated; 0: as asked
    critical_retry_after_s: float = 300.0
    # The lane paid images take while critical. Kiln's plans say "paid": paid work keeps
    # its lane. "free" (the rule before policy 6, and so the default when replaying a
    # decision recorded without it) sends it behind the free work already accepted.
    critical_paid_lane: Literal["paid", "free"] = "free"


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    plans: dict[str, Plan]
    pressure: PressureRules = PressureRules()
    shedding: Shedding = Shedding()

    def plan(self, name: str) -> Plan:
        return self.plans[name]


class ConfigError(Exception):
    pass


def load(path: Path) -> Config:
    """Read the plans file; raise ConfigError naming the file and what is wrong."""
    try:
        config = msgspec.convert(tomllib.loads(path.read_text()), Config)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError, ValueError) as error:
        raise ConfigError(f"{path}: {error}") from error
    if DEFAULT_PLAN not in config.plans:
        raise ConfigError(f"{path}: the `{DEFAULT_PLAN}` plan (for users without an account) is missing")
    return config
