"""What tracing costs: end-to-end requests per second with tracing on and off, in one run.

One platform (embedded NATS and PostgreSQL, Phoenix as the tracing UI). In rounds that
alternate, the four services are restarted with tracing on (every span exported over OTLP to
Phoenix) or off (spans unsampled: trace ids still travel, nothing is recorded); each round
sends `--requests` prompts, `--concurrency` at a time, each from a fresh user, at 1 step so
the platform's own work, not the render, sets the pace. The load generator itself records
no spans in either case. Prints the median rate of each setting and the cost, and writes
bench/results/tracing_cost.json.

    python -m bench.tracing_cost [--rounds 3] [--requests 60] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as host
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from infra.platform import SERVICES, Platform
from infra.tracing_ui import Phoenix
from kiln.client import KilnClient
from shared.events import ImageDelivered
from shared.settings import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"
PLANS = Path(__file__).with_name("plans.toml")  # every request granted


async def _round(stack: Platform, requests: int, concurrency: int) -> float:
    """Requests per second, from the first prompt sent to the last outcome received."""
    gate = asyncio.Semaphore(concurrency)
    async with await KilnClient.connect(stack.nats_url) as client:

        async def one() -> None:
            async with gate:
                outcome = await client.generate("a red circle", user_id=f"b{uuid.uuid4().hex[:12]}", steps=1)
            if not isinstance(outcome, ImageDelivered):
                raise RuntimeError(f"not delivered: {outcome}")

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (time.perf_counter() - started)


async def _restart_services(stack: Platform, tracing: bool, endpoint: str, trace_url: str) -> None:
    stack.stop_services()
    stack.otlp_endpoint, stack.trace_url = (endpoint, trace_url) if tracing else (None, None)
    for name in SERVICES:
        stack.start_service(name)
    await stack.wait_ready()


async def measure(rounds: int, requests: int, concurrency: int) -> dict:
    if not Phoenix.installed():
        raise SystemExit("the tracing UI is not installed: make .phoenix/.installed")
    os.environ["KILN_PLANS"] = str(PLANS)
    rates: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL)
        await stack.start()
        endpoint, trace_url = stack.otlp_endpoint, stack.trace_url
        try:
            await _round(stack, requests // 2, concurrency)  # warm-up: model loaded, caches filled
            for index in range(rounds * 2):
                setting = "on" if index % 2 == 0 else "off"
                await _restart_services(stack, setting == "on", endpoint, trace_url)
                await _round(stack, concurrency, concurrency)  # each process warm before timing
                rates[setting].append(await _round(stack, requests, concurrency))
                print(f"  round {index + 1}: tracing {setting:<3} {rates[setting][-1]:6.2f} requests/s")
        finally:
            stack.stop()
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {
        "benchmark": "tracing_cost",
        "requests_per_round": requests,
        "concurrency": concurrency,
        "model": f"{DEFAULT_MODEL.name}, 32x32, 1 step, CPU",
        "host": f"{host.node()} ({os.cpu_count()} cpus)",
        "requests_per_s": {"on": rates["on"], "off": rates["off"]},
        "median_on": round(on, 2),
        "median_off": round(off, 2),
        "cost_percent": round((1 - on / off) * 100, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing_cost")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each setting, alternating")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rounds, args.requests, args.concurrency))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "tracing_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"tracing on {result['median_on']} requests/s, off {result['median_off']} requests/s (medians): "
        f"tracing costs {result['cost_percent']} % (target: at most 5 %); wrote {out}"
    )


if __name__ == "__main__":
    main()
