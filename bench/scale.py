"""The render queue at crowd scale, on the bus alone: `make bench-scale`.

Starts an embedded nats-server (no auth), Kiln's dispatcher (services/render/dispatch.py)
and simulated render workers: each claims up to 16 jobs through `JobQueue.claim` as a real
worker does, holds them BATCH_S (the render), and acks each. No model, no database.

fair_queue  50 heavy free users with 60 jobs each wait in the queue, published user after
            user (the worst case for a first-in-first-out queue); then 8 workers start and
            100,000 users with one job each arrive in one spike (10 % on paid plans,
            published from another process as fast as the server takes them). Reports the
            consumers on the jobs stream, the first claim after the workers start, the total
            time, JetStream API requests per job, nats-server's peak RSS, paid and free p95
            wait (each job from its publish to its claim), and Jain's fairness index over the
            heavy users' jobs served until the first of them has had all 60 (1.0: they took
            turns; first in, first out gives 1/50).
workers     throughput with 1, 2, 4 and 8 workers over a standing backlog, and its ratio to
            N × one worker's.

    python -m bench.scale [--users 100000] [--heavy 50] [--workers 8]

Writes bench/results/scale.json (other keys in it, from other benchmarks, are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js
from opentelemetry import trace

from infra.embedded import EmbeddedNats, free_port
from infra.nats_auth import ADMIN_ACCESS
from services.render.dispatch import Dispatcher
from services.render.fleet import Fleet
from services.render.queue import JobQueue
from shared import subjects
from shared.bus import Bus
from shared.events import RenderRequested, decode, encode, utcnow

RESULTS = Path(__file__).parent / "results"
BATCH = 16
BATCH_S = 0.020  # a simulated render
HEAVY_JOBS = 60  # the pro plan's burst


def _job(user: str, tier: str) -> RenderRequested:
    return RenderRequested(
        request_id=uuid.uuid4().hex[:16],
        user_id=user,
        plan="pro" if tier == "paid" else "free",
        tier=tier,
        prompt="a red circle",
        width=32,
        height=32,
        steps=10,
        seed=1,
    )


def _jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values and any(values) else 0.0


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[18] if len(values) >= 20 else max(values, default=0.0)


class Served:
    """What the simulated workers did: per job, who, which tier, when claimed."""

    def __init__(self, rows: list[tuple[float, str, str, float]]) -> None:
        self.jobs = rows  # (claimed at, user, tier, waited s), time.time() clock
        self.first_claim = min((row[0] for row in rows), default=0.0)
        self.last_ack = max((row[0] for row in rows), default=0.0) + BATCH_S


def _simulated_worker(url: str, name: str, results: multiprocessing.Queue) -> None:
    """A render worker without a model, in a process of its own as real workers are: claim
    through the dispatcher, hold the batch BATCH_S, ack each job. Starts on `bench.go`,
    reports each batch on `bench.served`, ends on `bench.done`."""

    async def work() -> list[tuple[float, str, str, float]]:
        bus = await Bus.connect(url, "render", trace.get_tracer("bench"), ADMIN_ACCESS, None)
        control = await nats.connect(url)
        go, done = await control.subscribe("bench.go"), await control.subscribe("bench.done")
        await control.publish("bench.ready", name.encode())
        await go.next_msg(timeout=600)
        queue, rows = JobQueue(bus, name, ack_wait_s=30), []
        while True:
            messages = await queue.claim(BATCH, wait_s=0.2)
            if not messages:
                try:
                    await done.next_msg(timeout=0.001)
                    break
                except nats.errors.TimeoutError:
                    continue
            claimed = time.time()
            await asyncio.sleep(BATCH_S)
            for msg in messages:
                job = decode(msg.data, (msg.headers or {}).get("Content-Type"))
                rows.append((claimed, job.user_id, job.tier, claimed - job.requested_at.timestamp()))
                await msg.ack()
            await control.publish("bench.served", str(len(messages)).encode())
        await bus.close()
        await control.close()
        return rows

    results.put(asyncio.run(work()))


def _publish(
    url: str, backlog: list[tuple[str, RenderRequested]], spike: list[tuple[str, RenderRequested]], stored, go
) -> None:
    """From a process of its own: the backlog, then (on `go`) the spike, each job as fast as
    the server takes it, stamped with the moment it is published."""

    async def publish(js: nats.js.JetStreamContext, jobs: list[tuple[str, RenderRequested]]) -> None:
        for subject, job in jobs:
            job.requested_at = utcnow()
            await js.publish_async(subject, encode(job))
        await js.publish_async_completed()

    async def run() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream(publish_async_max_pending=256)  # a small client-side backlog: waits are the queue's
        await publish(js, backlog)
        stored.set()
        await asyncio.to_thread(go.wait)
        await publish(js, spike)
        await nc.close()

    asyncio.run(run())


@dataclass
class Run:
    served: Served
    started: float  # when the workers began (the backlog stored, the spike beginning)
    api_calls: int


async def _run(url: str, backlog: list, spike: list, workers: int) -> Run:
    """`workers` worker processes drain a `backlog` (published before they start) and a
    `spike` (published while they run, from another process) through a dispatcher in this
    process. The API calls count everything from the consumers' creation on."""
    bus = await Bus.connect(url, "render", trace.get_tracer("bench"), ADMIN_ACCESS, None)
    await bus.declare()
    control = await nats.connect(url)
    api_before = (await control.jetstream().account_info()).api.total
    fleet = Fleet("bench-dispatcher")
    fleet.nobody_answered = True
    dispatcher = Dispatcher(bus, fleet, ack_wait_s=30, max_deliver=20, max_attempts=13, window=4096, shares={"pro": 4})
    stop = asyncio.Event()
    dispatching = asyncio.ensure_future(dispatcher.run(stop))
    while not dispatcher.dispatching:
        await asyncio.sleep(0.05)
    served, ready = 0, 0

    async def count(msg) -> None:
        nonlocal served
        served += int(msg.data)

    async def up(msg) -> None:
        nonlocal ready
        ready += 1

    subscriptions = [await control.subscribe("bench.served", cb=count), await control.subscribe("bench.ready", cb=up)]
    await control.flush()  # subscribed at the server before any worker says it is ready
    context = multiprocessing.get_context("spawn")
    results, stored, go = context.Queue(), context.Event(), context.Event()
    processes = [context.Process(target=_simulated_worker, args=(url, f"w{n}", results)) for n in range(workers)]
    publisher = context.Process(target=_publish, args=(url, backlog, spike, stored, go))
    for process in [*processes, publisher]:
        process.start()
    while ready < workers:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(stored.wait)
    await asyncio.sleep(0.5)  # the dispatcher pulls what its window holds
    started = time.time()
    await control.publish("bench.go", b"")
    go.set()
    while served < len(backlog) + len(spike):
        await asyncio.sleep(0.02)
    await control.publish("bench.done", b"")
    await control.flush()
    rows = [row for _ in processes for row in await asyncio.to_thread(results.get)]
    for process in [*processes, publisher]:
        process.join()
    for subscription in subscriptions:
        await subscription.unsubscribe()
    api_calls = (await control.jetstream().account_info()).api.total - api_before - 1
    stop.set()
    await dispatching
    await bus.close()
    await control.close()
    return Run(Served(rows), started, api_calls)


def _consumers(url: str) -> int:
    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(subjects.RENDER_JOBS.name)).state.consumer_count
        finally:
            await nc.close()

    return asyncio.run(count())


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fair_queue(url: str, server_pid: int, users: int, heavy: int, workers: int) -> dict:
    heavy_users = [f"heavy{n:03}" for n in range(heavy)]
    backlog = [(subjects.render_job("free", u), _job(u, "free")) for u in heavy_users for _ in range(HEAVY_JOBS)]
    spike = []
    for n in range(users):
        tier = "paid" if n % 10 == 0 else "free"
        user = f"u{n:06}"
        spike.append((subjects.render_job(tier, user), _job(user, tier)))
    run = asyncio.run(_run(url, backlog, spike, workers))
    served, started, jobs = run.served, run.started, backlog + spike
    waits: dict[str, list[float]] = {"paid": [], "free": []}
    for _, user, tier, waited in served.jobs:
        if not user.startswith("heavy"):
            waits[tier].append(waited * 1000)
    # Fairness among users all waiting at once: the heavy users' jobs served until the first
    # of them has had all of its jobs (taking turns: equal; first in, first out: one user).
    taken: Counter[str] = Counter()
    for _, user, _, _ in sorted(served.jobs):
        if user.startswith("heavy"):
            taken[user] += 1
            if taken[user] >= HEAVY_JOBS:
                break
    return {
        "users": users + heavy,
        "jobs": len(jobs),
        "workers": workers,
        "consumers": _consumers(url),
        "first_claim_ms": round((served.first_claim - started) * 1000, 1),
        "total_s": round(served.last_ack - started, 2),
        "jobs_per_s": round(len(jobs) / (served.last_ack - started), 1),
        "jetstream_api_calls": run.api_calls,
        "api_calls_per_job": round(run.api_calls / len(jobs), 4),
        "nats_rss_mb": round(_peak_rss_mb(server_pid), 1),
        "fairness": round(_jain([float(taken[u]) for u in heavy_users]), 4),
        "paid_p95_wait_ms": round(_p95(waits["paid"]), 1),
        "free_p95_wait_ms": round(_p95(waits["free"]), 1),
    }


def throughput(url: str, counts: list[int], jobs_per_worker: int) -> dict:
    runs = {}
    for workers in counts:
        jobs = [
            (subjects.render_job("free", f"t{n % 500}"), _job(f"t{n % 500}", "free"))
            for n in range(workers * jobs_per_worker)
        ]
        run = asyncio.run(_run(url, jobs, [], workers))
        runs[workers] = len(jobs) / (run.served.last_ack - run.started)
    one = runs[counts[0]]
    return {
        "batch": BATCH,
        "batch_s": BATCH_S,
        "runs": [
            {"workers": n, "jobs_per_s": round(rate, 1), "ratio_to_n_times_one": round(rate / (n * one), 3)}
            for n, rate in runs.items()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--heavy", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs-per-worker", type=int, default=1500)
    parser.add_argument("--only", choices=("fair_queue", "workers"), help="run one part (the other's figures are kept)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-scale-") as root:
        server = EmbeddedNats(Path(root), free_port())
        url = server.start()
        try:
            assert server.process is not None
            results = {}
            if arguments.only in (None, "fair_queue"):
                results["fair_queue"] = fair_queue(
                    url, server.process.pid, arguments.users, arguments.heavy, arguments.workers
                )
            if arguments.only in (None, "workers"):
                results["workers"] = throughput(url, [1, 2, 4, 8], arguments.jobs_per_worker)
        finally:
            server.stop()
    results["at"] = utcnow().isoformat()
    print(json.dumps(results, indent=2))
    record(results)


def record(results: dict) -> None:
    """Write `results`' keys into bench/results/scale.json, keeping the other keys there
    (each part of `make bench-scale` writes its own)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "scale.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(previous | results, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
