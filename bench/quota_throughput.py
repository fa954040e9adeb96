"""Quota decisions per second and decision latency, beside the raw INSERT rate of the same
PostgreSQL, all in one run.

Starts NATS and PostgreSQL (embedded, or the servers in KILN_NATS_URL / KILN_DATABASE_URL,
in a fresh database) and only the quota service: 1, then 3 processes. Each of N users
(1, 10, 100) runs a closed loop: publish a PromptSubmitted, wait for its decision on
`kiln.quota.decided.<user>.<request>`, repeat. Latency is publish → decision received;
every decision is a grant logged, hash-chained and projected in Postgres and published
to JetStream (the bench plans allow everything, so no request is cut short by a denial).

    python -m bench.quota_throughput [--seconds 5]
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

import asyncpg
import nats
import nats.js.errors
from nats.js.api import StorageType
from opentelemetry import trace

from bench.e2e_latency import RESULTS, percentile
from infra.databases import create_database, drop_database
from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import CLIENT_ACCESS, KilnClient
from services.quota.migrate import upgrade
from shared import subjects
from shared.access import Access
from shared.bus import Bus, Message
from shared.events import PromptSubmitted
from shared.settings import Settings

BENCH_PLANS = Path(__file__).with_name("plans.toml")
# A client that also hears quota's decisions (as context does) and looks at the prompts
# consumer to see when every quota process is pulling.
BENCH_ACCESS = CLIENT_ACCESS | Access(
    subscribe=frozenset({subjects.QUOTA_DECIDED.pattern}),
    streams=frozenset({subjects.PROMPTS.name}),
)
USERS = (1, 10, 100)
PROCESSES = (1, 3)
RATES = (500, 1000, 2000)
bench_users: set[str] = set()  # every user the bench made up, for the clean-up


async def closed_loop(client: KilnClient, users: int, seconds: float, tag: str) -> dict[str, float]:
    """`users` users each submitting one prompt at a time for `seconds`."""
    waiting: dict[str, asyncio.Future] = {}

    async def on_decision(message: Message) -> None:
        future = waiting.pop(message.subject, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    sub = await client.bus.listen(subjects.QUOTA_DECIDED.pattern, on_decision)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def user_loop(user: str) -> None:
        bench_users.add(user)
        while time.perf_counter() < deadline:
            request = uuid.uuid4().hex[:16]
            done = asyncio.get_running_loop().create_future()
            waiting[subjects.quota_decided(user, request)] = done
            prompt = PromptSubmitted(request_id=request, user_id=user, prompt="a red circle")
            start = time.perf_counter()
            await client.submit(prompt)
            latencies.append((await asyncio.wait_for(done, 30) - start) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(user_loop(f"{tag}u{n}") for n in range(users)))
    elapsed = time.perf_counter() - began
    await sub.unsubscribe()
    return {
        "decisions": len(latencies),
        "decisions_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


async def open_loop(client: KilnClient, users: int, rate: float, seconds: float, tag: str) -> dict[str, float]:
    """Prompts offered at a fixed `rate` per second, spread over `users` users, whatever
    the answers: the latency a steady load sees (a closed loop cannot show it: with N users
    waiting, latency is N / throughput by Little's law)."""
    sent: dict[str, float] = {}
    latencies: list[float] = []
    all_in = asyncio.Event()

    async def on_decision(message: Message) -> None:
        start = sent.pop(message.subject, None)
        if start is not None:
            latencies.append((time.perf_counter() - start) * 1000)
            if not sent and publishing_done:
                all_in.set()

    sub = await client.bus.listen(subjects.QUOTA_DECIDED.pattern, on_decision)
    publishing_done = False
    total = int(rate * seconds)
    began = time.perf_counter()
    pending = set()
    for n in range(total):
        # Keep to the schedule: request n goes out at began + n / rate.
        delay = began + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        user, request = f"{tag}u{n % users}", uuid.uuid4().hex[:16]
        bench_users.add(user)
        sent[subjects.quota_decided(user, request)] = time.perf_counter()
        prompt = PromptSubmitted(request_id=request, user_id=user, prompt="a red circle")
        task = asyncio.create_task(client.submit(prompt))
        pending.add(task)
        task.add_done_callback(pending.discard)
    offered_for = time.perf_counter() - began
    publishing_done = True
    try:
        await asyncio.wait_for(all_in.wait(), 30)
    except TimeoutError:
        pass
    elapsed = time.perf_counter() - began
    await sub.unsubscribe()
    return {
        "offered_per_s": round(total / offered_for, 1),
        "decisions": len(latencies),
        "decisions_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


async def log_only_rate(url: str, seconds: float, batch: int) -> float:
    """The quota log alone: QuotaService.decide on batches of `batch` prompts (100 users),
    no bus. What Postgres and the decision code can do, beside the raw INSERT rate."""
    from services.quota import log as quota_log
    from services.quota import plans
    from services.quota.application import QuotaService
    from services.quota.pressure import FleetMonitor
    from shared.consuming import Received

    config = plans.load(BENCH_PLANS)
    pool = await quota_log.connect(url)
    quota = QuotaService(pool, None, config, FleetMonitor(config.pressure))
    count, deadline, began = 0, time.perf_counter() + seconds, time.perf_counter()
    while time.perf_counter() < deadline:
        prompts = [
            PromptSubmitted(request_id=uuid.uuid4().hex[:16], user_id=f"log{n % 100}", prompt="a red circle")
            for n in range(batch)
        ]
        await quota.decide([Received(prompt, None) for prompt in prompts])
        count += batch
    # These decisions are for nobody: keep the relay from publishing them later.
    await pool.execute("DELETE FROM quota_outbox")
    await pool.close()
    return round(count / (time.perf_counter() - began), 1)


async def raw_publish_rate(stack: Platform, seconds: float, publishers: int) -> float:
    """JetStream publishes acked by the same NATS, from `publishers` loops, to a scratch
    stream: the bus's own ceiling (each decision costs at least two: prompt and decision)."""
    # Plain nats-py, not the Bus: the figure is JetStream's own, beneath the bus, and the
    # bus only touches Kiln's declared streams, not a scratch one.
    nc = await nats.connect(stack.nats_url, **stack.nats_options(ADMIN))
    js = nc.jetstream()
    await js.add_stream(name="KILN_BENCH_RAW", subjects=["kiln.benchraw.>"], storage=StorageType.FILE)
    count, deadline = 0, time.perf_counter() + seconds
    payload = b"x" * 600  # about a decision's size

    async def loop(n: int) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await js.publish(f"kiln.benchraw.{n}", payload)
            count += 1

    began = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in range(publishers)))
    rate = count / (time.perf_counter() - began)
    await js.delete_stream("KILN_BENCH_RAW")
    await nc.close()
    return round(rate, 1)


async def purge_bench_users(stack: Platform, users: set[str]) -> None:
    """Remove the bench's prompts and decisions, so that a Kiln sharing this NATS does not
    turn tens of thousands of bench grants into render jobs."""
    # Plain nats-py: purging is an operator's act that the Bus does not offer.
    nc = await nats.connect(stack.nats_url, **stack.nats_options(ADMIN))
    js = nc.jetstream()
    for user in users:
        await js.purge_stream(subjects.PROMPTS.name, subject=subjects.prompt_submitted(user))
        await js.purge_stream(subjects.QUOTA.name, subject=subjects.quota_decided(user, "*"))
    await nc.close()


async def raw_insert_rate(url: str, seconds: float, connections: int) -> float:
    """Single-row INSERTs, each its own committed transaction, from `connections` loops."""
    pool = await asyncpg.create_pool(url, min_size=connections, max_size=connections)
    await pool.execute("CREATE TABLE IF NOT EXISTS bench_raw (id bigserial PRIMARY KEY, payload jsonb)")
    payload = json.dumps({"request_id": "r" * 16, "user_id": "u" * 12, "plan": "free", "used": 1})
    count = 0
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal count
        async with pool.acquire() as conn:
            while time.perf_counter() < deadline:
                await conn.execute("INSERT INTO bench_raw (payload) VALUES ($1::jsonb)", payload)
                count += 1

    began = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    rate = count / (time.perf_counter() - began)
    await pool.execute("DROP TABLE bench_raw")
    await pool.close()
    return round(rate, 1)


async def run(
    seconds: float,
    processes_runs: tuple[int, ...],
    users_runs: tuple[int, ...],
    rates: tuple[int, ...],
    settings: Settings,
) -> dict:
    os.environ["KILN_PLANS"] = str(BENCH_PLANS)  # for the quota processes this starts
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", Path(tmp) / "no-model", settings, tracing_ui=False)
        dropped = None
        if stack.database_url:
            stack.database_url, dropped = await create_database(stack.database_url, "kiln_bench")
        stack.start_servers()
        try:
            await stack.declare()  # the streams and buckets, as `kiln up` makes them before any service
            await asyncio.to_thread(upgrade, stack.database_url)
            raw = {
                "1 connection": await raw_insert_rate(stack.database_url, seconds, 1),
                "16 connections": await raw_insert_rate(stack.database_url, seconds, 16),
            }
            print(
                f"raw single-row INSERT, committed each: {raw['1 connection']:.0f}/s on one connection, "
                f"{raw['16 connections']:.0f}/s on 16"
            )
            log_only = {str(size): await log_only_rate(stack.database_url, seconds, size) for size in (1, 100)}
            print(
                f"the quota log alone (decide + append + commit, no bus): {log_only['1']:.0f} decisions/s "
                f"one at a time, {log_only['100']:.0f}/s in batches of 100"
            )
            raw_bus = {str(n): await raw_publish_rate(stack, seconds, n) for n in (1, 100)}
            print(
                f"raw JetStream publish, acked: {raw_bus['1']:.0f}/s from one publisher, "
                f"{raw_bus['100']:.0f}/s from 100"
            )
            bus = await Bus.connect(
                stack.nats_url, ADMIN, trace.get_tracer("kiln.bench"), BENCH_ACCESS, stack.credentials(ADMIN)
            )
            client = KilnClient(bus)
            runs = []
            for processes in processes_runs:
                names = [f"quota-{n}" for n in range(processes)]
                for name in names:
                    stack.start_service("quota", instance=name)
                await wait_for_quota(bus, stack, names)
                await closed_loop(client, 10, 1.0, f"warm{processes}")
                for users in users_runs:
                    result = await closed_loop(client, users, seconds, f"p{processes}n{users}x")
                    runs.append({"processes": processes, "users": users, "load": "closed loop", **result})
                    print(
                        f"{processes} quota process(es), {users:3d} users, each waiting for its answer: "
                        f"{result['decisions_per_s']:7.1f} decisions/s, p50 {result['p50_ms']:6.2f} ms, "
                        f"p99 {result['p99_ms']:6.2f} ms"
                    )
                for rate in rates:
                    result = await open_loop(client, 100, rate, seconds, f"p{processes}r{rate}x")
                    runs.append({"processes": processes, "users": 100, "load": f"open loop at {rate}/s", **result})
                    print(
                        f"{processes} quota process(es), 100 users, offered {result['offered_per_s']:6.0f}/s: "
                        f"{result['decisions_per_s']:7.1f} decisions/s, p50 {result['p50_ms']:6.2f} ms, "
                        f"p99 {result['p99_ms']:6.2f} ms"
                    )
                for name in names:
                    stack.stop_service(name)
            await client.close()
            if settings.nats_url:
                await purge_bench_users(stack, bench_users)  # leave a shared NATS as we found it
        finally:
            stack.stop()
            if dropped and settings.database_url:
                await drop_database(settings.database_url, dropped)
    return {
        "raw_insert_per_s": raw,
        "raw_publish_per_s_by_publishers": raw_bus,
        "log_only_decisions_per_s_by_batch": log_only,
        "runs": runs,
    }


async def wait_for_quota(bus: Bus, stack: Platform, names: list[str], timeout_s: float = 60) -> None:
    """Until every process is pulling from the prompts consumer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            consumers = await bus.consumers(subjects.PROMPTS)
        except nats.js.errors.NotFoundError:
            consumers = []  # no stream yet: quota has not declared it
        waiting = sum(info.num_waiting or 0 for info in consumers if info.name == subjects.DURABLE_QUOTA_PROMPTS)
        if waiting >= len(names):
            return
        for name in names:
            if stack.services[name].poll() is not None:
                raise RuntimeError(f"{name} exited; see {stack.log_dir}")
        await asyncio.sleep(0.2)
    raise TimeoutError("quota processes not ready")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quota_throughput")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--processes", type=int, nargs="+", default=PROCESSES)
    parser.add_argument("--users", type=int, nargs="+", default=USERS)
    parser.add_argument("--rates", type=int, nargs="*", default=RATES, help="open-loop offered loads, per second")
    args = parser.parse_args()
    settings = Settings.from_env()
    results = asyncio.run(run(args.seconds, tuple(args.processes), tuple(args.users), tuple(args.rates), settings))
    results |= {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": f"{host.node()} ({os.cpu_count()} CPUs)",
        "servers": "external" if settings.nats_url else "embedded (nats-server 2.15, PostgreSQL 18)",
        "seconds_per_run": args.seconds,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "quota_throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
