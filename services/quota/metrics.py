"""quota's Prometheus metrics (served on KILN_METRICS_PORT, see shared/telemetry.py).

quota sees every request's outcome (it consumes them all for refunds), so it is the one
place that counts requests by outcome and plan.
"""

from __future__ import annotations

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from services.quota.plans import PRESSURE_LEVELS
from services.quota.pressure import FleetMonitor
from shared.events import ImageDelivered, QuotaDenied, QuotaGranted, RequestFailed

meter = metrics.get_meter("kiln.quota")

requests = meter.create_counter("kiln_requests", description="Requests ended, by outcome and plan")
denials = meter.create_counter("kiln_quota_denials", description="Prompts denied, by reason and plan")
# Paid plans are looser but watched: grants past a plan's soft cap, by plan
# (`kiln accounts watch` lists who, with the decisions).
over_soft_cap = meter.create_counter(
    "kiln_quota_over_soft_cap", description="Grants past the plan's soft cap (served, but watched), by plan"
)


# How long appenders wait for a partition's lock: the cost of one order per partition. If
# it grows with load, the log wants more partitions (KILN_QUOTA_PARTITIONS).
lock_wait = meter.create_histogram(
    "kiln_quota_lock_wait", unit="s", description="Time to take a log partition's append lock"
)


def observe_lock_wait(seconds: float) -> None:
    lock_wait.record(seconds)


degraded = meter.create_counter(
    "kiln_quota_degraded", description="Grants degraded under fleet pressure (fewer steps than asked), by plan"
)


def count_degraded(grant: QuotaGranted) -> None:
    degraded.add(1, {"plan": grant.plan})


def count_outcome(outcome: QuotaDenied | ImageDelivered | RequestFailed) -> None:
    kind = {QuotaDenied: "denied", ImageDelivered: "delivered", RequestFailed: "failed"}[type(outcome)]
    requests.add(1, {"outcome": kind, "plan": outcome.plan or "unknown"})


def count_over_soft_cap(grant: QuotaGranted) -> None:
    over_soft_cap.add(1, {"plan": grant.plan})


def count_denial(denial: QuotaDenied) -> None:
    denials.add(1, {"reason": denial.reason, "plan": denial.plan})


def watch_pressure(fleet: FleetMonitor) -> None:
    """`kiln_fleet_pressure`: 0 normal, 1 elevated, 2 critical, as quota sheds load by it."""

    def observe(options: CallbackOptions) -> list[Observation]:
        level, _ = fleet.level()
        return [Observation(PRESSURE_LEVELS.index(level), {"level": level})]

    meter.create_observable_gauge(
        "kiln_fleet_pressure", callbacks=[observe], description="Fleet pressure: 0 normal, 1 elevated, 2 critical"
    )
