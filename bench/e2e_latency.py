"""End-to-end latency of `generate` minus the render's own time.

Starts the platform as the tests do (embedded servers in a temporary folder, or the servers
in KILN_NATS_URL / KILN_DATABASE_URL), sends N sequential requests through the SDK and
reports p50 / p95 of: the whole request, the pipeline's own render time (as the render
worker measured it), and their difference: what the platform adds (bus hops, the quota
decision in Postgres, storage, delivery).

    python -m bench.e2e_latency [--requests 100]
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
from datetime import UTC, datetime
from pathlib import Path

from infra.platform import Platform
from kiln.client import CLIENT_ACCESS, KilnClient
from shared import subjects
from shared.access import Access
from shared.events import ImageDelivered, QuotaGranted, RenderCompleted
from shared.settings import DEFAULT_MODEL, Settings

RESULTS = Path(__file__).parent / "results"
# A client that also reads the quota decision and the render result of its requests, for
# the timestamps the services recorded on them.
BENCH_ACCESS = CLIENT_ACCESS | Access(streams=frozenset({subjects.QUOTA.name, subjects.RENDER_EVENTS.name}))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "min_ms": round(min(values), 2),
        "max_ms": round(max(values), 2),
    }


STAGES = {
    "quota": "submitted → decided: bus, reading the user's log",
    "context, store": "decided → rendered, less the queue: publishes, context, checks, PNG store",
    "queue": "job requested → its batch starts: dispatcher, claim",
    "delivery": "render completed → delivered",
    "back to client": "delivered → the client has read the stored outcome",
}


async def _stage_times(client: KilnClient, delivered: ImageDelivered, received_at: datetime) -> dict[str, float]:
    """Where the time outside the render went, from the timestamps the services recorded
    on their events (all processes share this machine's clock)."""
    user, request = delivered.user_id, delivered.request_id
    granted = await client.bus.last_message(subjects.QUOTA, subjects.quota_decided(user, request))
    rendered = await client.bus.last_message(subjects.RENDER_EVENTS, subjects.render_event(user, request))
    assert granted is not None and rendered is not None
    grant, done = granted.event(), rendered.event()
    assert isinstance(grant, QuotaGranted) and isinstance(done, RenderCompleted)

    def ms(start: datetime, end: datetime) -> float:
        return (end - start).total_seconds() * 1000

    return {
        "quota": ms(grant.submission.submitted_at, grant.decided_at),
        "context, store": ms(grant.decided_at, done.completed_at) - done.render_ms - (done.queued_ms or 0.0),
        "queue": done.queued_ms or 0.0,
        "delivery": ms(done.completed_at, delivered.delivered_at),
        "back to client": ms(delivered.delivered_at, received_at),
    }


async def connect_client(stack: Platform) -> KilnClient:
    """An SDK client whose bus may also read what `_stage_times` needs."""
    # The launcher's credential (the bench plays context and the client), held to BENCH_ACCESS.
    return KilnClient(await stack.bus(access=BENCH_ACCESS))


async def measure(requests: int, warmup: int, settings: Settings) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, settings, tracing_ui=False)
        await stack.start()
        try:
            async with await connect_client(stack) as client:
                total, render, overhead = [], [], []
                stages: dict[str, list[float]] = {name: [] for name in STAGES}
                for index in range(warmup + requests):
                    user = f"bench{uuid.uuid4().hex[:10]}"  # one request per user: under the free limit
                    started = time.perf_counter()
                    outcome = await client.generate("a red circle on a blue background", user_id=user)
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    received_at = datetime.now(UTC)
                    if not isinstance(outcome, ImageDelivered):
                        raise RuntimeError(f"request {index} did not deliver: {outcome}")
                    if index >= warmup:
                        total.append(elapsed_ms)
                        render.append(outcome.render_ms)
                        overhead.append(elapsed_ms - outcome.render_ms)
                        for name, ms in (await _stage_times(client, outcome, received_at)).items():
                            stages[name].append(ms)
        finally:
            stack.stop()
    return {
        "benchmark": "e2e_latency",
        "requests": requests,
        "warmup": warmup,
        "model": f"{DEFAULT_MODEL.name}, 32x32, 10 steps, CPU",
        "servers": "external" if settings.nats_url else "embedded (nats-server 2.15, PostgreSQL 18)",
        "host": f"{host.node()} ({os.cpu_count()} cpus)",
        "end_to_end": summary(total),
        "render_own_time": summary(render),
        "end_to_end_minus_render": summary(overhead),
        "stages": {name: summary(values) for name, values in stages.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e_latency")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(measure(args.requests, args.warmup, Settings.from_env()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "e2e_latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"generate, {result['requests']} sequential requests ({result['servers']}):")
    for key in ("end_to_end", "render_own_time", "end_to_end_minus_render"):
        figures = result[key]
        print(f"  {key:<24} p50 {figures['p50_ms']:8.2f} ms   p95 {figures['p95_ms']:8.2f} ms")
    print("  of which, outside the render:")
    for name, figures in result["stages"].items():
        print(f"    {name:<22} p50 {figures['p50_ms']:8.2f} ms   p95 {figures['p95_ms']:8.2f} ms   ({STAGES[name]})")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
