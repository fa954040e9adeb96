"""What authentication on the bus costs: requests end to end with KILN_NATS_AUTH on and off,
and the time to connect with a user's credential.

Two platforms side by side (embedded NATS and PostgreSQL, Kiln's own model on the CPU), N
sequential requests through the SDK on each, alternating: with auth on, each request is sent by a
client connected with its user's own credential (as a user's CLI or app would be); with auth
off, by a client with none. Prints the medians and writes bench/results/auth_cost.json.

    python -m bench.auth_cost [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from infra.nats_auth import Authority, user_credentials_file, user_permissions
from infra.platform import Platform
from kiln.client import KilnClient
from shared.events import ImageDelivered
from shared.settings import DEFAULT_MODEL, PROJECT_ROOT, Settings

RESULTS = PROJECT_ROOT / "bench" / "results"
PLANS = Path(__file__).with_name("plans.toml")  # every request granted: no user hits a limit
USERS = 8  # requests go round these users, each connected with its own credential
# The first label goes first in each round; measured, that order moved the figures by about
# 5 ms (whichever went first was slower), so "off" goes first: the bias is against the result.
LABELS = {"auth off": False, "auth on": True}
READS = 1000


async def measure(requests: int, warmup: int) -> dict[str, dict]:
    """Both platforms up side by side, requests alternating between them, so that what the
    machine does meanwhile (it is shared and noisy) falls on both alike."""
    async with contextlib.AsyncExitStack() as running:
        stacks = {label: await running.enter_async_context(_platform(auth)) for label, auth in LABELS.items()}
        clients = {
            label: [await _connect(stack, f"bench{uuid.uuid4().hex[:10]}") for _ in range(USERS)]
            for label, stack in stacks.items()
        }
        connects = [await _connect_time(stacks["auth on"]) for _ in range(20)]
        total: dict[str, list[float]] = {label: [] for label in LABELS}
        outside_render: dict[str, list[float]] = {label: [] for label in LABELS}
        for index in range(warmup + requests):
            for label in LABELS:
                user, client = clients[label][index % USERS]
                started = time.perf_counter()
                outcome = await client.generate("a red circle", user_id=user)
                if not isinstance(outcome, ImageDelivered):
                    raise RuntimeError(f"request {index} ({label}) did not deliver: {outcome}")
                if index >= warmup:
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    total[label].append(elapsed_ms)
                    outside_render[label].append(elapsed_ms - outcome.render_ms)  # the bus's share
        # The bus alone: a user reading its stored outcome (one permission-checked request to
        # JetStream and its reply), alternating between the platforms.
        reads: dict[str, list[float]] = {label: [] for label in LABELS}
        last = {label: clients[label][0] for label in LABELS}
        for _ in range(READS):
            for label in LABELS:
                user, client = last[label]
                started = time.perf_counter()
                await client.recorded_outcome(user, "no-such-request")
                reads[label].append((time.perf_counter() - started) * 1000)
        for label in LABELS:
            for _, client in clients[label]:
                await client.close()
    result = {
        label: {
            "p50_ms": _percentile(total[label], 50),
            "p95_ms": _percentile(total[label], 95),
            "outside_render_p50_ms": _percentile(outside_render[label], 50),
            "outside_render_p95_ms": _percentile(outside_render[label], 95),
            "outcome_read_p50_ms": _percentile(reads[label], 50),
        }
        for label in LABELS
    }
    result["auth on"]["connect_with_user_credential_p50_ms"] = _percentile(connects, 50)
    return result


@contextlib.asynccontextmanager
async def _platform(auth: bool) -> AsyncIterator[Platform]:
    # Embedded servers only: an external NATS does not trust Kiln's operator.
    settings = dataclasses.replace(Settings.from_env(), nats_auth=auth, nats_url=None)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, settings, tracing_ui=False)
        try:
            await stack.start()
            yield stack
        finally:
            stack.stop()


async def _connect(stack: Platform, user: str) -> tuple[str, KilnClient]:
    assert stack.nats_url
    if not stack.nats_auth:
        return user, await KilnClient.connect(stack.nats_url)
    creds = _user_credential(stack, user)
    return user, await KilnClient.connect(stack.nats_url, creds, user)


def _user_credential(stack: Platform, user: str) -> Path:
    path = user_credentials_file(stack.data_dir, user)
    return Authority.open(stack.data_dir).write_credentials(path, user, user_permissions(user))


async def _connect_time(stack: Platform) -> float:
    user = f"c{uuid.uuid4().hex[:10]}"
    creds = _user_credential(stack, user)
    assert stack.nats_url
    started = time.perf_counter()
    client = await KilnClient.connect(stack.nats_url, creds, user)
    elapsed = (time.perf_counter() - started) * 1000
    await client.close()
    return elapsed


def _percentile(values: list[float], pct: int) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return round(statistics.quantiles(ordered, n=100)[pct - 1] if len(ordered) > 1 else ordered[0], 3)


def main() -> None:
    os.environ["KILN_PLANS"] = str(PLANS)  # for the services this starts
    parser = argparse.ArgumentParser(prog="python -m bench.auth_cost")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    measured = asyncio.run(measure(args.requests, args.warmup))
    on, off = measured["auth on"], measured["auth off"]
    result = {
        "benchmark": "auth_cost",
        "requests": args.requests,
        "auth_on": on,
        "auth_off": off,
        "p50_added_ms": round(on["p50_ms"] - off["p50_ms"], 2),
        "outside_render_p50_added_ms": round(on["outside_render_p50_ms"] - off["outside_render_p50_ms"], 2),
        "outcome_read_p50_added_ms": round(on["outcome_read_p50_ms"] - off["outcome_read_p50_ms"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "auth_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.requests} sequential requests, end to end (embedded servers, Kiln's model on the CPU):")
    for label, figures in (("auth on", on), ("auth off", off)):
        print(
            f"  {label:<9} p50 {figures['p50_ms']:8.2f} ms   p95 {figures['p95_ms']:8.2f} ms   "
            f"outside the render: p50 {figures['outside_render_p50_ms']:7.2f} ms   "
            f"p95 {figures['outside_render_p95_ms']:7.2f} ms"
        )
    print(
        f"  auth adds {result['p50_added_ms']:.2f} ms at p50 "
        f"({result['outside_render_p50_added_ms']:.2f} ms outside the render)"
    )
    print(
        f"  a user's outcome read, {READS} each: p50 {on['outcome_read_p50_ms']:.3f} ms on, "
        f"{off['outcome_read_p50_ms']:.3f} ms off ({result['outcome_read_p50_added_ms']:+.3f} ms)"
    )
    print(f"  connect with a user credential: p50 {on['connect_with_user_credential_p50_ms']:.2f} ms")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
