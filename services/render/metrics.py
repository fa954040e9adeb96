"""render's Prometheus metrics (served on KILN_METRICS_PORT, see shared/telemetry.py).

The fleet figures are the worker's last heartbeat, read when Prometheus scrapes; batch
sizes and render times are recorded as each batch finishes, each job's queue wait as its
batch starts, and the jobs in flight while a batch renders.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from shared.events import WorkerHeartbeat
from shared.telemetry import SECONDS_UP_TO_10_MIN

meter = metrics.get_meter("kiln.render")

# Seconds, from a tiny model's batch up to 10 minutes (a 512×512, 50-step job renders for
# about 8 on a CPU): a wait or a render past the last bucket counts only in +Inf, where no
# quantile can be read from it.

batch_sizes = meter.create_histogram(
    "kiln_render_batch_size",
    description="Jobs rendered in one pipeline call",
    explicit_bucket_boundaries_advisory=[1, 2, 4, 8, 16, 32],
)
render_seconds = meter.create_histogram(
    "kiln_render_duration",
    unit="s",
    description="A batch's pipeline time, without queueing or storage",
    explicit_bucket_boundaries_advisory=SECONDS_UP_TO_10_MIN,
)
queue_wait_seconds = meter.create_histogram(
    "kiln_render_queue_wait",
    unit="s",
    description="A job's wait from its request (context's RenderRequested) to the start of its batch, by tier",
    explicit_bucket_boundaries_advisory=SECONDS_UP_TO_10_MIN,
)


class LastHeartbeat:
    """The gauges read the worker's latest heartbeat."""

    beat: WorkerHeartbeat | None = None


class InFlight:
    """The jobs in the pipeline call now: the worker counts them in and out."""

    jobs: int = 0


meter.create_observable_gauge(
    "kiln_render_in_flight",
    callbacks=[lambda options: [Observation(InFlight.jobs)]],
    description="Jobs rendering now (in a pipeline call; not those waiting for one)",
)


def _observe(read) -> callable:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        beat = LastHeartbeat.beat
        if beat is None:
            return []
        return [Observation(value, attributes) for value, attributes in read(beat) if value is not None]

    return callback


def _gauge(name: str, description: str, read, unit: str = "") -> None:
    meter.create_observable_gauge(name, callbacks=[_observe(read)], unit=unit, description=description)


_gauge(
    "kiln_render_queue_depth",
    "Jobs waiting for a worker, by tier",
    lambda b: [(b.queue_depth_paid, {"tier": "paid"}), (b.queue_depth_free, {"tier": "free"})],
)
_gauge(
    "kiln_render_images_per_second",
    "Images finished per second, over the last minute",
    lambda b: [(b.images_per_s, {"worker": b.worker_id})],
)
_gauge(
    "kiln_render_batch_limit",
    "The largest batch the thermal guard allows now (0: paused)",
    lambda b: [(b.batch_limit, {"worker": b.worker_id})],
)
_gauge(
    "kiln_gpu_temperature_celsius",
    "GPU temperature (NVML)",
    lambda b: [(b.gpu_temperature_c, {"worker": b.worker_id, "device": b.device})],
)
_gauge(
    "kiln_gpu_utilisation_ratio",
    "GPU busy fraction (NVML)",
    lambda b: [(b.gpu_utilisation, {"worker": b.worker_id, "device": b.device})],
)
_gauge(
    "kiln_gpu_memory_used_ratio",
    "GPU memory in use, fraction (NVML)",
    lambda b: [(b.gpu_memory_used, {"worker": b.worker_id, "device": b.device})],
)
_gauge(
    "kiln_gpu_power_watts",
    "GPU power draw (NVML)",
    lambda b: [(b.gpu_power_w, {"worker": b.worker_id, "device": b.device})],
)
_gauge(
    "kiln_cpu_load_per_core",
    "1-minute load average per core (the figure on a CPU host)",
    lambda b: [(b.cpu_load, {"worker": b.worker_id})],
)
