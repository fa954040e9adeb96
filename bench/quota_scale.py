"""Quota decisions per second with 1, 2 and 4 quota processes and 1 and 16 log partitions,
beside the raw single-row INSERT rate of the same PostgreSQL at the same client count:
the `quota` key of `make bench-scale`.

Starts NATS and PostgreSQL (embedded, or the servers in KILN_NATS_URL / KILN_DATABASE_URL)
and only quota. For each partition count, a fresh database migrated to that many
partitions; for each process count, C users (100) in a closed loop: publish a
PromptSubmitted, wait for its decision, repeat (`bench.quota_throughput.closed_loop`).
Meanwhile pg_stat_activity is sampled every 20 ms: the average number of quota's
connections waiting for a lock (a partition's head) and running at all, which is what
the partitions are meant to change.

    python -m bench.quota_scale [--seconds 8] [--clients 100]

Each run is recorded in `quota.runs` of bench/results/scale.json as
{"processes", "partitions", "clients", "decisions_per_s", "p99_ms", "raw_insert_per_s", …}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import asyncpg
from opentelemetry import trace

from bench.quota_throughput import (
    BENCH_ACCESS,
    BENCH_PLANS,
    bench_users,
    closed_loop,
    purge_bench_users,
    raw_insert_rate,
    wait_for_quota,
)
from bench.scale import record
from infra.databases import create_database, drop_database
from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import KilnClient
from services.quota.migrate import upgrade
from shared.bus import Bus
from shared.events import utcnow
from shared.settings import QUOTA_ROLE, Settings

PROCESSES = (1, 2, 4)
PARTITIONS = (1, 16)
SAMPLE_S = 0.02
# Connections the raw INSERT loops use, at most: PostgreSQL's default max_connections is
# 100, and the quota processes' pools (10 each) must fit beside them in the other runs.
RAW_CONNECTIONS = 60


async def sample_waits(url: str, stop: asyncio.Event) -> dict[str, float]:
    """Until `stop`: the average number of quota's connections in a transaction, and of
    those waiting for a lock."""
    conn = await asyncpg.connect(url)
    samples, busy, waiting = 0, 0, 0
    try:
        while not stop.is_set():
            row = await conn.fetchrow(
                """
                SELECT count(*) FILTER (WHERE state <> 'idle') AS busy,
                       count(*) FILTER (WHERE wait_event_type = 'Lock') AS waiting
                FROM pg_stat_activity WHERE usename = $1 AND datname = current_database()
                """,
                QUOTA_ROLE,
            )
            samples, busy, waiting = samples + 1, busy + row["busy"], waiting + row["waiting"]
            await asyncio.sleep(SAMPLE_S)
    finally:
        await conn.close()
    return {
        "busy_connections_avg": round(busy / max(samples, 1), 2),
        "lock_waiting_avg": round(waiting / max(samples, 1), 2),
    }


async def measure(stack: Platform, client: KilnClient, processes: int, clients: int, seconds: float, tag: str) -> dict:
    names = [f"quota-{tag}-{n}" for n in range(processes)]
    for name in names:
        stack.start_service("quota", instance=name)
    try:
        await wait_for_quota(client.bus, stack, names)
        await closed_loop(client, clients, 1.0, f"warm{tag}")
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_waits(stack.database_url, stop))
        result = await closed_loop(client, clients, seconds, tag)
        stop.set()
        return result | await sampler
    finally:
        for name in names:
            stack.stop_service(name)


async def run(
    seconds: float, clients: int, settings: Settings, processes_runs=PROCESSES, partitions_runs=PARTITIONS
) -> dict:
    os.environ["KILN_PLANS"] = str(BENCH_PLANS)  # for the quota processes this starts
    runs = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        stack = Platform.isolated(Path(tmp) / "kiln", Path(tmp) / "no-model", settings, tracing_ui=False)
        stack.start_servers()
        server_url = stack.database_url
        assert server_url
        try:
            await stack.declare()
            bus = await Bus.connect(
                stack.nats_url, ADMIN, trace.get_tracer("kiln.bench"), BENCH_ACCESS, stack.credentials(ADMIN)
            )
            client = KilnClient(bus)
            for partitions in partitions_runs:
                url, name = await create_database(server_url, f"kiln_bench_p{partitions}")
                try:
                    await asyncio.to_thread(upgrade, url, partitions)
                    raw = await raw_insert_rate(url, seconds, min(clients, RAW_CONNECTIONS))
                    stack.database_url = url  # the quota processes' database
                    for processes in processes_runs:
                        tag = f"p{processes}n{partitions}"
                        result = await measure(stack, client, processes, clients, seconds, tag)
                        runs.append(
                            {
                                "processes": processes,
                                "partitions": partitions,
                                "clients": clients,
                                "decisions_per_s": result["decisions_per_s"],
                                "p99_ms": result["p99_ms"],
                                "raw_insert_per_s": raw,
                                "p50_ms": result["p50_ms"],
                                "ratio_to_raw": round(result["decisions_per_s"] / raw, 3),
                                "busy_connections_avg": result["busy_connections_avg"],
                                "lock_waiting_avg": result["lock_waiting_avg"],
                            }
                        )
                        print(
                            f"{processes} process(es), {partitions:2d} partition(s), {clients} clients: "
                            f"{result['decisions_per_s']:7.1f} decisions/s ({runs[-1]['ratio_to_raw']:.2f} of "
                            f"{raw:.0f} raw INSERTs/s), p50 {result['p50_ms']:6.1f} ms, p99 {result['p99_ms']:6.1f} ms, "
                            f"lock waiting {result['lock_waiting_avg']:.2f} of {result['busy_connections_avg']:.2f} busy"
                        )
                finally:
                    stack.database_url = server_url
                    await drop_database(server_url, name)
            await client.close()
            if settings.nats_url:
                await purge_bench_users(stack, bench_users)  # leave a shared NATS as we found it
        finally:
            stack.stop()
    return {
        "runs": runs,
        "seconds_per_run": seconds,
        "raw_insert_connections": min(clients, RAW_CONNECTIONS),
        "servers": "external" if settings.nats_url else "embedded (nats-server 2.15, PostgreSQL 18)",
        "host_cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quota_scale")
    parser.add_argument("--seconds", type=float, default=8.0, help="per run")
    parser.add_argument("--clients", type=int, default=100, help="users in the closed loop")
    parser.add_argument("--processes", type=int, nargs="+", default=PROCESSES)
    parser.add_argument("--partitions", type=int, nargs="+", default=PARTITIONS)
    arguments = parser.parse_args()
    started = time.monotonic()
    quota = asyncio.run(
        run(arguments.seconds, arguments.clients, Settings.from_env(), arguments.processes, arguments.partitions)
    )
    quota["at"] = utcnow().isoformat()
    quota["took_s"] = round(time.monotonic() - started, 1)
    record({"quota": quota})


if __name__ == "__main__":
    main()
