"""What tracing costs: end-to-end requests per second with tracing on and off, in one run.

One platform (embedded NATS and PostgreSQL, and Phoenix). In rounds that take the settings
in turn, the four services are restarted with
  - `off`: spans unsampled (trace ids still travel, nothing is recorded);
  - `on`: every span recorded and exported over OTLP/HTTP to a collector that takes it and
    answers at once (a stand-in for a tracing backend on another host): what tracing costs
    the services themselves;
  - `phoenix`: exported to Phoenix on this same host, which stores every span in SQLite and
    so competes with the services for the same cores.
Each round sends `--requests` prompts, `--concurrency` at a time, from 48 users (the
bench plans grant everything), at 1 step so the platform's own work, not the render, sets
the pace. (Not a fresh user per request: the render queue keeps a consumer per user for
`ack_wait` after their last job, and thousands of them slow every claim; that would drift
the rounds apart, whatever tracing does.) The load generator records
no spans. Prints the median rate of each setting and the costs, and writes
bench/results/tracing_cost.json.

    python -m bench.tracing_cost [--rounds 3] [--requests 60] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform as host
import statistics
import tempfile
import time
from pathlib import Path

from infra.nats_auth import ADMIN
from infra.platform import SERVICES, Platform
from infra.tracing_ui import Phoenix
from kiln.client import KilnClient
from shared.events import ImageDelivered
from shared.settings import DEFAULT_MODEL, Settings

RESULTS = Path(__file__).parent / "results"
PLANS = Path(__file__).with_name("plans.toml")  # every request granted


USERS = [f"bench-{index}" for index in range(48)]


async def _round(stack: Platform, requests: int, concurrency: int) -> float:
    """Requests per second, from the first prompt sent to the last outcome received."""
    gate = asyncio.Semaphore(concurrency)
    async with await KilnClient.connect(stack.nats_url, stack.credentials(ADMIN), ADMIN) as client:

        async def one(index: int) -> None:
            async with gate:
                outcome = await client.generate("a red circle", user_id=USERS[index % len(USERS)], steps=1)
            if not isinstance(outcome, ImageDelivered):
                raise RuntimeError(f"not delivered: {outcome}")

        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(requests)))
        return requests / (time.perf_counter() - started)


async def _restart_services(stack: Platform, endpoint: str | None) -> None:
    stack.stop_services()
    stack.otlp_endpoint = endpoint
    for name in SERVICES:
        stack.start_service(name)
    await stack.wait_ready()


async def _null_collector() -> tuple[asyncio.Server, str]:
    """An OTLP/HTTP endpoint that reads each export and answers 200 at once."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()  # the exporter closed the connection, or the bench is over

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def measure(rounds: int, requests: int, concurrency: int) -> dict:
    if not Phoenix.installed():
        raise SystemExit("the tracing UI is not installed: make .phoenix/.installed")
    os.environ["KILN_PLANS"] = str(PLANS)  # for the services this starts
    # Its own Phoenix for the `phoenix` rounds, not the one of a `make run` on this machine
    # (which `Settings.from_env` finds when KILN_OTLP_ENDPOINT is unset).
    settings = dataclasses.replace(Settings.from_env(), otlp_endpoint=None, trace_url=None)
    rates: dict[str, list[float]] = {"off": [], "on": [], "phoenix": []}
    collector, collector_url = await _null_collector()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, settings)
        await stack.start()
        endpoints = {"off": None, "on": collector_url, "phoenix": stack.otlp_endpoint}
        try:
            await _round(stack, requests // 2, concurrency)  # warm-up: model loaded, caches filled
            for index in range(rounds):
                for setting, endpoint in endpoints.items():
                    await _restart_services(stack, endpoint)
                    await _round(stack, concurrency, concurrency)  # each process warm before timing
                    rates[setting].append(await _round(stack, requests, concurrency))
                    print(f"  round {index + 1}: tracing {setting:<7} {rates[setting][-1]:6.2f} requests/s")
        finally:
            stack.stop()
            collector.close()
    off, on, phoenix = (statistics.median(rates[setting]) for setting in ("off", "on", "phoenix"))
    return {
        "benchmark": "tracing_cost",
        "requests_per_round": requests,
        "concurrency": concurrency,
        "model": f"{DEFAULT_MODEL.name}, 32x32, 1 step, CPU",
        "host": f"{host.node()} ({os.cpu_count()} cpus)",
        "requests_per_s": rates,
        "median_off": round(off, 2),
        "median_on": round(on, 2),
        "median_phoenix_same_host": round(phoenix, 2),
        "cost_percent": round((1 - on / off) * 100, 1),
        "cost_percent_phoenix_same_host": round((1 - phoenix / off) * 100, 1),
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
        f"requests/s (medians): off {result['median_off']}, on {result['median_on']} (cost "
        f"{result['cost_percent']} %, target at most 5 %), exporting to Phoenix on this host "
        f"{result['median_phoenix_same_host']} (cost {result['cost_percent_phoenix_same_host']} %); wrote {out}"
    )


if __name__ == "__main__":
    main()
