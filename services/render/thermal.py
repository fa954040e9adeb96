"""GPU readings (NVML) and the thermal guard that keeps a hot GPU from getting hotter.

Above `hot_c` the worker takes half-size batches; above `pause_c` it takes no new work at
all until the GPU is back under `resume_c` (hysteresis, so it does not flap at the line).
Jobs it does not take stay in the queue for cooler workers. A reading can be injected for
tests and fire drills: `KILN_INJECT_GPU_TEMPERATURE=/path/to/file` holding degrees Celsius.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("kiln.render.thermal")


@dataclass(frozen=True)
class GpuReading:
    temperature_c: float | None = None
    utilisation: float | None = None  # 0..1
    memory_used: float | None = None  # 0..1
    power_w: float | None = None


class Gpu:
    """NVML readings for the GPU this process renders on; all None on a CPU host."""

    def __init__(self) -> None:
        self._handle = None
        self._nvml = None
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            # CUDA_VISIBLE_DEVICES pins the worker to one GPU; NVML still counts them all.
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
            self._nvml = pynvml
        except Exception as error:  # noqa: BLE001 - no driver, no GPU: a CPU host
            log.debug("no NVML: %s", error)

    def read(self) -> GpuReading:
        """Each figure the GPU reports; one it does not (MIG slices, some boards) is None."""
        nvml, handle = self._nvml, self._handle
        if nvml is None:
            return GpuReading()

        def figure(query):
            try:
                return query()
            except nvml.NVMLError as error:
                log.debug("NVML: %s", error)
                return None

        memory = figure(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        temperature = figure(lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        utilisation = figure(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        power = figure(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        return GpuReading(
            temperature_c=None if temperature is None else float(temperature),
            utilisation=None if utilisation is None else utilisation / 100,
            memory_used=None if memory is None else memory.used / memory.total,
            power_w=None if power is None else power / 1000,
        )


def injected_temperature(path: Path | None) -> float | None:
    """The temperature written in `path` (KILN_INJECT_GPU_TEMPERATURE), read each time."""
    if path is None:
        return None
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


class ThermalGuard:
    def __init__(
        self,
        temperature: Callable[[], float | None],
        max_batch: int,
        *,
        hot_c: float = 80.0,
        pause_c: float = 87.0,
        resume_c: float = 75.0,
    ) -> None:
        self.temperature = temperature
        self.max_batch = max_batch
        self.hot_c, self.pause_c, self.resume_c = hot_c, pause_c, resume_c
        self.paused = False

    def batch_limit(self) -> int:
        """The largest batch to take now: `max_batch`, half of it when hot, 0 when paused."""
        celsius = self.temperature()
        if celsius is None:
            return self.max_batch
        if self.paused and celsius < self.resume_c:
            log.info("cooled to %.0f °C: taking work again", celsius)
            self.paused = False
        elif not self.paused and celsius >= self.pause_c:
            log.warning("%.0f °C: pausing intake until below %.0f °C", celsius, self.resume_c)
            self.paused = True
        if self.paused:
            return 0
        return max(1, self.max_batch // 2) if celsius >= self.hot_c else self.max_batch
