"""`kiln audit verify` on a big log: its time and peak memory, and the checkpoint lag.

    .venv/bin/python -m bench.audit_verify --events 1000000

Starts a PostgreSQL of its own (a temporary folder, port 15499), fills the quota log with
`--events` decisions hashed by the real chain code (a realistic denial with its inputs in the
metadata) and COPYs them in, then runs `audit.verify` against signed checkpoints every 1000
events, reporting wall time and the process's peak resident memory. The checkpoint lag is
measured with the real `checkpoints.checkpoint_once` schedule: the time from a decision's
commit to the checkpoint that covers it.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nacl.signing

from infra.embedded import EmbeddedPostgres
from services.quota import audit, chain, checkpoints
from services.quota import log as quota_log
from services.quota.log_events import QuotaAdjusted
from services.quota.migrate import upgrade

COLUMNS = [
    "stream_id",
    "version",
    "event_type",
    "request_id",
    "payload",
    "metadata",
    "recorded_at",
    "prev_hash",
    "hash",
]


def _rows(count: int, users: int = 1000):
    head, versions, now = chain.GENESIS, {}, datetime.now(UTC)
    for n in range(count):
        user = f"user{n % users}"
        versions[user] = versions.get(user, 0) + 1
        submission = {"type": "PromptSubmitted", "request_id": f"r{n}", "user_id": user, "prompt": "a red circle",
                      "width": 1024, "height": 1024, "steps": 30, "seed": 2**63 - 1, "strength": -0.0}  # fmt: skip
        payload = {"type": "QuotaDenied", "request_id": f"r{n}", "user_id": user, "reason": "invalid",
                   "detail": "strength", "plan": "free", "decided_at": now.isoformat()}  # fmt: skip
        metadata = {"policy_version": 3, "decider": "bench", "trace_id": "0" * 32, "pressure": "normal",
                    "pressure_why": "", "inputs": {"submission": submission, "pricing": {"step_seconds": 1e308}}}  # fmt: skip
        row = dict(stream_id=f"user:{user}", version=versions[user], event_type="QuotaDenied", request_id=f"r{n}",
                   payload=payload, metadata=metadata, recorded_at=now, prev_hash=head)  # fmt: skip
        head = chain.event_hash(**row)
        yield (*row.values(), head)


async def _fill(url: str, count: int) -> None:
    pool = await quota_log.connect(url, size=1)
    try:
        async with pool.acquire() as conn:
            # COPY is binary: JSONB's binary form is a version byte and the JSON text.
            await conn.set_type_codec(
                "jsonb",
                encoder=lambda value: b"\x01" + msgspec.json.encode(value),
                decoder=lambda data: msgspec.json.decode(data[1:]),
                schema="pg_catalog",
                format="binary",
            )
            rows, chunk = _rows(count), []
            for row in rows:  # in chunks, so that the fill's memory stays below verify's
                chunk.append(row)
                if len(chunk) == 20_000:
                    await conn.copy_records_to_table("quota_events", records=chunk, columns=COLUMNS)
                    last, chunk = chunk[-1][-1], []
            if chunk:
                await conn.copy_records_to_table("quota_events", records=chunk, columns=COLUMNS)
                last = chunk[-1][-1]
            await conn.execute(  # one chain: partition 0
                "UPDATE quota_chain_head SET hash = $1, position = (SELECT max(position) FROM quota_events)"
                " WHERE partition = 0",
                last,
            )
    finally:
        await pool.close()


async def _verify(url: str, key: nacl.signing.SigningKey) -> tuple[float, int, list[str]]:
    pool = await quota_log.connect(url, size=1)
    try:
        async with pool.acquire() as conn:
            hashes = await conn.fetch("SELECT position, hash FROM quota_events WHERE position % 1000 = 0")
            signed = [
                checkpoints.sign(key, [checkpoints.Head(0, r["position"], r["hash"])], datetime.now(UTC))
                for r in hashes
            ]
            started = time.perf_counter()
            report = await audit.verify(conn, signed, key.verify_key)
            return time.perf_counter() - started, report.events, report.broken
    finally:
        await pool.close()


async def _lag(url: str, key: nacl.signing.SigningKey, decisions: int = 20) -> list[float]:
    """Append one event at a time at random moments; time each until a checkpoint covers it."""
    pool = await quota_log.connect(url, size=2)
    schedule, lags, appended = checkpoints.Schedule(), [], {}

    async def publish(checkpoint: checkpoints.Checkpoint) -> None:
        for position in [p for p in appended if p <= checkpoint.position]:
            lags.append(time.monotonic() - appended.pop(position))

    stop = asyncio.Event()

    async def checkpointer() -> None:
        while not stop.is_set():
            await checkpoints.checkpoint_once(pool, key, schedule, publish)
            await asyncio.sleep(checkpoints.POLL_S)

    task = asyncio.create_task(checkpointer())
    try:
        for n in range(decisions):
            async with quota_log.appending(pool, 0) as log:
                event = QuotaAdjusted(request_id=f"adjust-{n}", user_id="lag", day="2026-01-01", images=1, by="bench")
                (position,) = await log.append([quota_log.Entry(event, {})])
            appended[position] = time.monotonic()
            await asyncio.sleep(0.37 * (n % 7))
        while appended:
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
        await pool.close()
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--port", type=int, default=15499)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        postgres = EmbeddedPostgres(Path(folder) / "data", args.port)
        url = postgres.start()
        try:
            upgrade(url)
            key = nacl.signing.SigningKey.generate()
            started = time.perf_counter()
            asyncio.run(_fill(url, args.events))
            print(f"filled {args.events} events in {time.perf_counter() - started:.1f} s")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            seconds, events, broken = asyncio.run(_verify(url, key))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(f"verify: {events} events in {seconds:.1f} s ({events / seconds:,.0f}/s), {len(broken)} problems")
            print(f"peak RSS {peak / 1024:.0f} MiB (before verify {before / 1024:.0f} MiB: the fill holds the rows)")
            lags = sorted(asyncio.run(_lag(url, key)))
            print(
                f"checkpoint lag over {len(lags)} decisions: median {lags[len(lags) // 2]:.1f} s, max {lags[-1]:.1f} s"
            )
        finally:
            postgres.stop()


if __name__ == "__main__":
    main()
