"""What authentication on the bus costs: requests end to end with KILN_NATS_AUTH on and off,
and the time to connect with a user's credential.

Two platforms in turn (embedded NATS and PostgreSQL, Kiln's own model on the CPU), the same
N sequential requests through the SDK on each: with auth on, each request is sent by a
client connected with its user's own credential (as a user's CLI or app would be); with auth
off, by a client with none. Prints the medians and writes bench/results/auth_cost.json.

    python -m bench.auth_cost [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from infra.nats_auth import Authority, user_permissions
from infra.platform import Platform
from kiln.client import KilnClient
from shared.events import ImageDelivered
from shared.settings import DEFAULT_MODEL, PROJECT_ROOT, Settings

RESULTS = PROJECT_ROOT / "bench" / "results"
USERS = 8  # requests go round these users (each under the test plans' limits)


async def measure(auth: bool, requests: int, warmup: int) -> dict:
    # Embedded servers only: an external NATS does not trust Kiln's operator.
    settings = dataclasses.replace(Settings.from_env(), nats_auth=auth, nats_url=None)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", DEFAULT_MODEL, settings)
        await stack.start()
        try:
            clients = [await _connect(stack, f"bench{uuid.uuid4().hex[:10]}", Path(tmp)) for _ in range(USERS)]
            connects = [await _connect_time(stack, Path(tmp)) for _ in range(20)] if auth else []
            total = []
            for index in range(warmup + requests):
                user, client = clients[index % USERS]
                started = time.perf_counter()
                outcome = await client.generate("a red circle", user_id=user)
                if not isinstance(outcome, ImageDelivered):
                    raise RuntimeError(f"request {index} did not deliver: {outcome}")
                if index >= warmup:
                    total.append((time.perf_counter() - started) * 1000)
            for _, client in clients:
                await client.close()
        finally:
            stack.stop()
    result = {"p50_ms": _percentile(total, 50), "p95_ms": _percentile(total, 95)}
    if connects:
        result["connect_with_user_credential_p50_ms"] = _percentile(connects, 50)
    return result


async def _connect(stack: Platform, user: str, folder: Path) -> tuple[str, KilnClient]:
    assert stack.nats_url
    if not stack.nats_auth:
        return user, await KilnClient.connect(stack.nats_url)
    creds = Authority.open(stack.data_dir).write_credentials(folder / f"{user}.creds", user, user_permissions(user))
    return user, await KilnClient.connect(stack.nats_url, creds, user)


async def _connect_time(stack: Platform, folder: Path) -> float:
    user = f"c{uuid.uuid4().hex[:10]}"
    creds = Authority.open(stack.data_dir).write_credentials(folder / f"{user}.creds", user, user_permissions(user))
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
    return round(statistics.quantiles(ordered, n=100)[pct - 1] if len(ordered) > 1 else ordered[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_cost")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()
    on = asyncio.run(measure(True, args.requests, args.warmup))
    off = asyncio.run(measure(False, args.requests, args.warmup))
    result = {
        "benchmark": "auth_cost",
        "requests": args.requests,
        "auth_on": on,
        "auth_off": off,
        "p50_added_ms": round(on["p50_ms"] - off["p50_ms"], 2),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "auth_cost.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.requests} sequential requests, end to end (embedded servers, Kiln's model on the CPU):")
    for label, figures in (("auth on", on), ("auth off", off)):
        print(f"  {label:<9} p50 {figures['p50_ms']:8.2f} ms   p95 {figures['p95_ms']:8.2f} ms")
    print(f"  auth adds {result['p50_added_ms']:.2f} ms at p50")
    print(f"  connect with a user credential: p50 {on['connect_with_user_credential_p50_ms']:.2f} ms")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
