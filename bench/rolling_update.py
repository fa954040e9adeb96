"""A rolling update of the render fleet under load: `make bench-scale`'s `rolling_update`.

Starts the platform as the tests do (embedded servers, the bench plans: every request is
granted), with WORKERS render workers. CLIENTS clients each keep one request in flight
(a new user per request) for BEFORE_S seconds; then `Platform.roll("render")` replaces the
workers one at a time (SIGTERM, exit, start, first heartbeat) while the clients go on.
Reports requests sent, delivered, lost (no outcome), failed, and p50/p95 latency before
and during the roll.

    python -m bench.rolling_update [--workers 3] [--clients 4]

Writes the `rolling_update` key of bench/results/scale.json (other keys are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.scale import record
from infra.platform import Platform
from kiln.client import KilnClient
from shared.events import ImageDelivered, RequestFailed, utcnow
from shared.settings import DEFAULT_MODEL, Settings

BENCH_PLANS = Path(__file__).parent / "plans.toml"
BEFORE_S = 30.0
REQUEST_TIMEOUT_S = 300.0


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50_ms": round(values[0], 1) if values else 0.0, "p95_ms": round(values[0], 1) if values else 0.0}
    cuts = statistics.quantiles(values, n=20)
    return {"p50_ms": round(statistics.median(values), 1), "p95_ms": round(cuts[18], 1)}


async def measure(workers: int, clients: int) -> dict:
    os.environ["KILN_PLANS"] = str(BENCH_PLANS)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-roll-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, Settings.from_env(), tracing_ui=False)
        await stack.start()
        try:
            for n in range(2, workers + 1):
                stack.start_service("render", instance=f"render-{n}")
            async with KilnClient(await stack.bus()) as client:
                return await _load_and_roll(stack, client, workers, clients)
        finally:
            stack.stop()


async def _load_and_roll(stack: Platform, client: KilnClient, workers: int, clients: int) -> dict:
    phase = "before"
    latencies: dict[str, list[float]] = {"before": [], "during": []}
    outcomes = {"sent": 0, "delivered": 0, "failed": 0, "lost": 0}
    stop = asyncio.Event()

    async def one_client() -> None:
        while not stop.is_set():
            started, sent_in = time.perf_counter(), phase
            outcomes["sent"] += 1
            try:
                outcome = await client.generate(
                    "a red circle", user_id=f"roll{uuid.uuid4().hex[:10]}", timeout_s=REQUEST_TIMEOUT_S
                )
            except TimeoutError:
                outcomes["lost"] += 1
                continue
            if isinstance(outcome, ImageDelivered):
                outcomes["delivered"] += 1
                latencies[sent_in].append((time.perf_counter() - started) * 1000)
            elif isinstance(outcome, RequestFailed):
                outcomes["failed"] += 1

    running = [asyncio.ensure_future(one_client()) for _ in range(clients)]
    await asyncio.sleep(BEFORE_S)
    phase = "during"
    started = time.monotonic()
    exits = await stack.roll("render", grace_s=120)
    rolled_s = time.monotonic() - started
    stop.set()
    await asyncio.gather(*running)
    return {
        "workers": workers,
        "clients": clients,
        **outcomes,
        "rolled_s": round(rolled_s, 1),
        "exit_codes": sorted({code for _, code in exits}, key=str),
        "before": _percentiles(latencies["before"]),
        "during": _percentiles(latencies["during"]),
        "p95_during_vs_before": round(
            _percentiles(latencies["during"])["p95_ms"] / max(_percentiles(latencies["before"])["p95_ms"], 1e-9), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rolling_update")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    arguments = parser.parse_args()
    result = asyncio.run(measure(arguments.workers, arguments.clients)) | {"at": utcnow().isoformat()}
    print(json.dumps({"rolling_update": result}, indent=2))
    record({"rolling_update": result})


if __name__ == "__main__":
    main()
