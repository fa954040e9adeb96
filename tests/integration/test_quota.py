"""Quota as the system of record, on real PostgreSQL and NATS: exact limits across several
quota processes, no decision lost to a crash, refunds, load shedding, and audits that
catch tampering and reproduce every decision."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import msgspec
import nacl.signing
import nats.js.errors
import pytest

from infra.platform import Platform
from kiln.client import KilnClient
from services.quota import accounts, audit, chain, checkpoints, plans, policy
from services.quota import log as quota_log
from services.quota.application import QuotaService
from services.quota.log_events import QuotaRefunded
from services.quota.migrate import upgrade
from services.quota.pressure import FleetMonitor
from shared import subjects
from shared.consuming import Received
from shared.events import (
    ImageDelivered,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    RequestFailed,
    WorkerHeartbeat,
    encode,
)
from shared.failpoints import EXIT_CODE
from shared.settings import PROJECT_ROOT
from tests.conftest import TEST_PLANS, replaced

PARTITIONS = 8  # a partitioned log's, in the tests of one

pytestmark = pytest.mark.integration


def _prompt(user: str, request_id: str | None = None, text: str = "a red circle") -> PromptSubmitted:
    return PromptSubmitted(request_id=request_id or uuid.uuid4().hex[:16], user_id=user, prompt=text)


async def _logged(db: asyncpg.Connection, user: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM quota_events WHERE stream_id = $1 ORDER BY version", quota_log.user_stream(user)
    )


async def _wait_for_decisions(db: asyncpg.Connection, user: str, count: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [row for row in await _logged(db, user) if row["event_type"] in ("QuotaGranted", "QuotaDenied")]
        if len(rows) >= count or time.monotonic() > deadline:
            return [
                {**dict(row), "payload": json.loads(row["payload"]), "metadata": json.loads(row["metadata"])}
                for row in rows
            ]
        await asyncio.sleep(0.2)


def _kiln(*args: str, database_url: str) -> subprocess.CompletedProcess:
    # (wide enough that a table's rows stay on one line each)
    env = os.environ | {"KILN_DATABASE_URL": database_url, "KILN_PLANS": str(TEST_PLANS), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@contextlib.asynccontextmanager
async def _fleet_pressure(client: KilnClient, queue_depth: int) -> AsyncIterator[None]:
    """A (pretend) render worker reporting a deep queue, as long as the block runs."""
    beat = WorkerHeartbeat(
        worker_id="test-hot-worker", device="cpu", model="tiny", queue_depth=queue_depth, cpu_load=0.1
    )

    async def beat_forever() -> None:
        while True:
            await client.nc.publish(subjects.fleet_telemetry(beat.worker_id), encode(beat))
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(beat_forever())
    await asyncio.sleep(0.6)  # quota has heard it
    try:
        yield
    finally:
        beating.cancel()
        await asyncio.sleep(2.5)  # stale_after_s in the test plans: pressure is normal again


# -- exact limits, nothing lost ---------------------------------------------------------


async def test_three_quota_processes_grant_exactly_three_of_a_hundred_concurrent_prompts(
    platform: Platform, client: KilnClient, db: asyncpg.Connection, user: str
):
    small_batches = {"KILN_QUOTA_BATCH": "4"}  # so that all three get a share of the work
    with replaced(platform, "quota", *[(f"quota-{n}", small_batches) for n in (1, 2, 3)]):
        await asyncio.gather(*(client.submit(_prompt(user)) for _ in range(100)))
        decisions = await _wait_for_decisions(db, user, 100)

    kinds = [row["event_type"] for row in decisions]
    assert (kinds.count("QuotaGranted"), kinds.count("QuotaDenied")) == (3, 97)
    assert {row["payload"]["reason"] for row in decisions if row["event_type"] == "QuotaDenied"} == {"daily_limit"}
    assert [row["version"] for row in decisions] == list(range(1, 101))
    assert len({row["metadata"]["decider"] for row in decisions}) >= 2, "one process took all the work"
    info = await client.js.stream_info(subjects.QUOTA.name, subjects_filter=f"kiln.quota.decided.{user}.*")
    assert len(info.state.subjects or {}) == 100  # every decision on the bus, once
    assert (await _verify(platform.database_url)).broken == []  # three writers, one unbroken chain


async def test_a_decision_committed_by_a_process_that_dies_before_publishing_still_arrives(
    platform: Platform, client: KilnClient, db: asyncpg.Connection, user: str
):
    prompt = _prompt(user)
    dies_after_commit = ("quota-doomed", {"KILN_FAILPOINT": "quota.after_commit"})
    with replaced(platform, "quota", dies_after_commit):
        await client.submit(prompt)
        doomed = platform.services["quota-doomed"]
        assert await asyncio.to_thread(doomed.wait, 60) == EXIT_CODE
        # Committed, never published.
        assert [row["event_type"] for row in await _logged(db, user)] == ["QuotaGranted"]
        with pytest.raises(nats.js.errors.NotFoundError):
            await client.js.get_last_msg(subjects.QUOTA.name, subjects.quota_decided(user, prompt.request_id))

    # The restarted quota's relay publishes it (the prompt itself is redelivered only after
    # its 60 s ack wait), and the request completes with the logged decision.
    outcome = await client.wait_for_outcome(user, prompt.request_id, timeout_s=30)
    assert isinstance(outcome, ImageDelivered), outcome
    assert len(await _logged(db, user)) == 1


async def test_a_failed_render_is_refunded_and_the_user_can_generate_again(
    platform: Platform, client: KilnClient, db: asyncpg.Connection, user: str
):
    for _ in range(2):
        assert isinstance(await client.generate("a green square", user_id=user), ImageDelivered)
    with replaced(platform, "render", ("render-failing", {"KILN_FAILPOINT": "render.job:raise"})):
        failed = await client.generate("a blue circle", user_id=user, timeout_s=90)
    assert isinstance(failed, RequestFailed) and (failed.stage, failed.reason) == ("render", "gave_up")

    refunded = await _wait_for_event(db, user, "QuotaRefunded")
    assert (refunded["request_id"], refunded["payload"]["reason"]) == (failed.request_id, "gave_up")
    # Three granted, one of them refunded: a third image today is allowed, a fourth is not.
    assert isinstance(await client.generate("a blue circle", user_id=user), ImageDelivered)
    denied = await client.generate("a blue circle", user_id=user)
    assert isinstance(denied, QuotaDenied) and denied.reason == "daily_limit"
    usage = await db.fetchrow("SELECT granted, refunded FROM quota_usage WHERE user_id = $1", user)
    assert (usage["granted"], usage["refunded"]) == (4, 1)


async def _wait_for_event(db: asyncpg.Connection, user: str, event_type: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for row in await _logged(db, user):
            if row["event_type"] == event_type:
                return {**dict(row), "payload": json.loads(row["payload"])}
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {event_type} for {user} in {timeout_s} s")


# -- plans and load shedding ------------------------------------------------------------


async def test_plans_burst_limits_soft_caps_and_shedding_by_fleet_pressure(
    platform: Platform, client: KilnClient, db: asyncpg.Connection
):
    free, plus, pro = (f"{plan}{uuid.uuid4().hex[:10]}" for plan in ("free", "plus", "pro"))
    for name, plan in ((plus, "plus"), (pro, "pro")):
        assert _kiln("accounts", "add", name, plan, database_url=platform.database_url).returncode == 0

    # plus: two at once (the second past the soft cap of 1, so flagged), then rate limited.
    first, second, third = [await client.generate("a red square", user_id=plus) for _ in range(3)]
    assert isinstance(first, ImageDelivered) and isinstance(second, ImageDelivered)
    assert isinstance(third, QuotaDenied) and third.reason == "rate_limit" and third.retry_at is not None
    flags = [
        row["payload"]["over_soft_cap"]
        for row in await _wait_for_decisions(db, plus, 2)
        if row["event_type"] == "QuotaGranted"
    ]
    assert flags == [False, True]
    # Watched: the operator sees who went past, with the request that did, and a metric counts it.
    watched = _kiln("accounts", "watch", database_url=platform.database_url)
    assert watched.returncode == 0, watched.stderr
    row = next(line for line in watched.stdout.splitlines() if plus in line)
    assert second.request_id in row and " 2 " in f" {row} ", row  # used 2, soft cap 1
    metrics = httpx.get(f"http://127.0.0.1:{platform.metrics_ports['quota']}/metrics", timeout=10).text
    assert re.search(r'^kiln_quota_over_soft_cap_total\{plan="plus"\} [1-9]', metrics, re.MULTILINE), metrics

    async with _fleet_pressure(client, queue_depth=1500):  # elevated
        # free: one image, degraded (2 steps instead of 10, the test plans' cap), then one
        # per hour while elevated; paid users are not touched.
        degraded = await client.generate("a red square", user_id=free, steps=10)
        assert isinstance(degraded, ImageDelivered)
        # The image tells its user why it has fewer steps.
        assert degraded.composition.degraded == "10 steps asked, 2 rendered while the fleet is elevated"
        limited = await client.generate("a red square", user_id=free)
        assert isinstance(limited, QuotaDenied) and (limited.reason, limited.pressure) == ("rate_limit", "elevated")
        assert isinstance(await client.generate("a red square", user_id=pro), ImageDelivered)

    async with _fleet_pressure(client, queue_depth=6000):  # critical
        shed = await client.generate("a red square", user_id=free)
        assert isinstance(shed, QuotaDenied) and (shed.reason, shed.pressure) == ("capacity", "critical")
        assert shed.retry_at is not None
        served = await client.generate("a red square", user_id=pro)
        assert isinstance(served, ImageDelivered)

    grant = next(row for row in await _wait_for_decisions(db, free, 1) if row["request_id"] == degraded.request_id)
    assert (grant["payload"]["steps"], grant["payload"]["submission"]["steps"]) == (2, 10)
    assert grant["payload"]["degraded"] == "10 steps asked, 2 rendered while the fleet is elevated"
    metrics = httpx.get(f"http://127.0.0.1:{platform.metrics_ports['quota']}/metrics", timeout=10).text
    assert re.search(r'^kiln_quota_degraded_total\{plan="free"\} [1-9]', metrics, re.MULTILINE), metrics
    shed = [line for line in metrics.splitlines() if line.startswith("kiln_quota_denials_total{")]
    assert any('plan="free"' in line and 'reason="capacity"' in line for line in shed), shed

    pro_grants = [row for row in await _wait_for_decisions(db, pro, 2) if row["event_type"] == "QuotaGranted"]
    assert [(g["payload"]["tier"], g["metadata"]["pressure"]) for g in pro_grants] == [
        ("paid", "elevated"),
        ("paid", "critical"),  # paid work keeps its lane (`critical_paid_lane`)
    ]

    # An admin grant: two more images for the free user today, logged as an event.
    assert _kiln("accounts", "grant", free, "2", "--note", "sorry", database_url=platform.database_url).returncode == 0
    assert (await _wait_for_event(db, free, "QuotaAdjusted"))["payload"]["images"] == 2
    listing = _kiln("accounts", "list", database_url=platform.database_url)
    assert plus in listing.stdout and pro in listing.stdout

    # Replay reproduces every decision in the log: these, and every other test's so far.
    pool = await quota_log.connect(platform.database_url)
    try:
        async with pool.acquire() as conn:
            report = await audit.replay(conn)
    finally:
        await pool.close()
    assert report.mismatches == [] and report.checked >= 8  # this test made 8
    replayed = _kiln("audit", "replay", "--user", pro, database_url=platform.database_url)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "2 decisions re-run, 0 not reproduced" in replayed.stdout


async def test_account_commands_refuse_bad_requests_clearly(platform: Platform, user: str):
    unknown_plan = _kiln("accounts", "add", user, "gold", database_url=platform.database_url)
    assert unknown_plan.returncode == 64 and "unknown plan 'gold'" in unknown_plan.stderr
    no_account = _kiln("accounts", "set-plan", user, "pro", database_url=platform.database_url)
    assert no_account.returncode == 64 and "has no account" in no_account.stderr
    assert _kiln("accounts", "add", user, "plus", database_url=platform.database_url).returncode == 0
    twice = _kiln("accounts", "add", user, "plus", database_url=platform.database_url)
    assert twice.returncode == 64 and "already" in twice.stderr
    bad_user = _kiln("accounts", "add", "a.b", "plus", database_url=platform.database_url)
    assert bad_user.returncode == 64 and "user id" in bad_user.stderr


async def test_accounts_usage_lists_everyone_who_used_images_that_day_with_their_plan_and_limit(
    platform: Platform, client: KilnClient, db: asyncpg.Connection
):
    walk_in, subscriber = (f"{kind}{uuid.uuid4().hex[:10]}" for kind in ("walkin", "plus"))
    assert _kiln("accounts", "add", subscriber, "plus", database_url=platform.database_url).returncode == 0
    for user, prompts in ((walk_in, 2), (subscriber, 1)):
        await asyncio.gather(*(client.submit(_prompt(user)) for _ in range(prompts)))
        await _wait_for_decisions(db, user, prompts)
    assert _kiln("accounts", "grant", walk_in, "2", database_url=platform.database_url).returncode == 0

    usage = _kiln("accounts", "usage", database_url=platform.database_url)
    assert usage.returncode == 0, usage.stderr
    rows = _table_rows(usage.stdout)
    # user → plan, used, granted, refunded, added by admin, allowed, left
    assert rows[walk_in] == ["free (no account)", "2", "2", "0", "2", "5", "3"]  # no account: the free plan
    assert rows[subscriber] == ["plus", "1", "1", "0", "0", "6", "5"]
    assert f"images used on {policy.utc_day(datetime.now(UTC))} (UTC)" in usage.stdout

    before = _kiln("accounts", "usage", "--date", "2000-01-01", database_url=platform.database_url)
    assert before.returncode == 0 and "nobody used images on 2000-01-01 (UTC)" in before.stdout
    bad_day = _kiln("accounts", "usage", "--date", "yesterday", database_url=platform.database_url)
    assert bad_day.returncode == 64 and "not a day as YYYY-MM-DD: 'yesterday'" in bad_day.stderr


def _table_rows(text: str) -> dict[str, list[str]]:
    """A printed table's body rows: first cell → the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) > 1:
            rows[cells[0]] = cells[1:]
    return rows


# -- audits on a log of their own --------------------------------------------------------


async def _write_log(url: str, users: int = 3, prompts_each: int = 4, refund: bool = True) -> None:
    """Decisions made by the real service code, appended to a scratch database: all to
    partition 0 (a service that knows one partition), so positions follow one another."""
    pool = await quota_log.connect(url)
    config = plans.load(TEST_PLANS)
    quota = QuotaService(pool, None, config, FleetMonitor(config.pressure))  # deciding needs no bus
    try:
        for n in range(prompts_each):
            batch = [Received(_prompt(f"user{u}", f"r{n}"), None) for u in range(users)]
            await quota.decide(batch)
        if refund:
            async with quota_log.appending(pool, 0) as log:  # the service's one partition
                refunded = QuotaRefunded(request_id="r0", user_id="user0", day=_today(), reason="gave_up")
                await log.append([quota_log.Entry(refunded, {})])
    finally:
        await pool.close()


def _today() -> str:
    return policy.utc_day(datetime.now(UTC))


async def _verify(url: str) -> audit.ChainReport:
    conn = await quota_log.connect(url)
    try:
        async with conn.acquire() as c:
            return await audit.verify(c)
    finally:
        await conn.close()


TAMPERING = {
    "newest removed": "DELETE FROM quota_events WHERE position >= 12",
    "edited": "UPDATE quota_events SET payload = jsonb_set(payload, '{used}', '1') WHERE position = 6",
    "deleted": "DELETE FROM quota_events WHERE position = 6",
    # Swap two rows' contents (moved aside first, as the unique indexes want).
    "reordered": """
        UPDATE quota_events SET version = -version, request_id = request_id || '~' WHERE position IN (6, 7);
        UPDATE quota_events e SET stream_id = o.stream_id, version = -o.version, event_type = o.event_type,
            request_id = rtrim(o.request_id, '~'), payload = o.payload, metadata = o.metadata,
            recorded_at = o.recorded_at, prev_hash = o.prev_hash, hash = o.hash
        FROM quota_events o WHERE (e.position, o.position) IN ((6, 7), (7, 6))
    """,
}


@pytest.mark.parametrize("tampering", TAMPERING)
async def test_verify_names_the_first_edited_deleted_or_reordered_event(scratch_database: str, tampering: str):
    await _write_log(scratch_database)
    intact = _kiln("audit", "verify", "--no-checkpoints", database_url=scratch_database)
    assert intact.returncode == 0 and "intact: 13 events" in intact.stdout

    conn = await asyncpg.connect(scratch_database)
    try:  # what a superuser could do: switch the append-only trigger off and rewrite history
        await conn.execute("ALTER TABLE quota_events DISABLE TRIGGER quota_events_append_only")
        await conn.execute(TAMPERING[tampering])
        await conn.execute("ALTER TABLE quota_events ENABLE TRIGGER quota_events_append_only")
    finally:
        await conn.close()

    broken = _kiln("audit", "verify", "--no-checkpoints", database_url=scratch_database)
    assert broken.returncode == 1
    first = broken.stdout.splitlines()[0]
    if tampering == "newest removed":  # the chain left is whole: only the head can tell
        assert first.startswith("BROKEN: partition 0 ends with hash") and "newest events were removed" in first
        return
    named = 7 if tampering == "deleted" else 6  # after a deletion, the event that follows the gap
    assert first.startswith(f"BROKEN: event at position {named} "), first
    assert ("edited" if tampering == "edited" else "removed, inserted or reordered") in first


async def test_the_log_cannot_be_changed_while_its_trigger_stands(scratch_database: str):
    await _write_log(scratch_database, users=1, prompts_each=1)
    conn = await asyncpg.connect(scratch_database)
    try:
        for statement in ("UPDATE quota_events SET version = 9", "DELETE FROM quota_events", "TRUNCATE quota_events"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                await conn.execute(statement)
    finally:
        await conn.close()


async def test_replay_lists_a_decision_the_policy_would_not_make(scratch_database: str):
    await _write_log(scratch_database, users=1, prompts_each=3, refund=False)
    pool = await quota_log.connect(scratch_database)
    try:  # forge a fourth grant for user0 (free: 3 a day), appended after the real three
        third = await pool.fetchrow("SELECT payload, metadata FROM quota_events WHERE request_id = 'r2'")
        forged = msgspec.convert(third["payload"] | {"request_id": "r9", "used": 4}, QuotaGranted)
        metadata = third["metadata"]
        # The state it claims to have seen is the true one: three granted, the bucket after the third.
        metadata["inputs"]["state_before"] = {
            "usage": {forged.day: {"granted": 3, "refunded": 0, "extra": 0}},
            "bucket": {"tokens": third["payload"]["tokens_left"], "at": third["payload"]["decided_at"]},
        }
        async with quota_log.appending(pool, 0) as log:
            await log.append([quota_log.Entry(forged, metadata)])
    finally:
        await pool.close()

    replayed = _kiln("audit", "replay", database_url=scratch_database)
    assert replayed.returncode == 1
    assert "NOT REPRODUCED position" in replayed.stdout and "user0/r9" in replayed.stdout
    assert "1 not reproduced" in replayed.stdout and "reason" in replayed.stdout
    # The chain is intact: the forgery was appended like any event. Replay is what catches it.
    assert _kiln("audit", "verify", "--no-checkpoints", database_url=scratch_database).returncode == 0


async def test_usage_projection_is_rebuilt_from_the_log(scratch_database: str, tmp_path: Path):
    await _write_log(scratch_database)
    conn = await asyncpg.connect(scratch_database)
    try:
        usage = "SELECT * FROM quota_usage ORDER BY user_id, day"
        buckets = "SELECT * FROM quota_buckets ORDER BY user_id"
        before = (await conn.fetch(usage), await conn.fetch(buckets))
        await conn.execute("UPDATE quota_usage SET granted = 0")  # a projection gone wrong
        rebuilt = _kiln("audit", "rebuild", database_url=scratch_database)
        assert rebuilt.returncode == 0 and "for 3 users" in rebuilt.stdout
        assert (await conn.fetch(usage), await conn.fetch(buckets)) == before
        assert [row["refunded"] for row in before[0]] == [1, 0, 0]
    finally:
        await conn.close()

    exported = tmp_path / "log.jsonl"
    assert _kiln("audit", "export", "-o", str(exported), database_url=scratch_database).returncode == 0
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(lines) == 13 and lines[0]["position"] == 1 and lines[-1]["event_type"] == "QuotaRefunded"


# -- the log in partitions ---------------------------------------------------------------


def _quota(pool: asyncpg.Pool, partitions: int) -> QuotaService:
    config = plans.load(TEST_PLANS)
    return QuotaService(pool, None, config, FleetMonitor(config.pressure), partitions=partitions)


async def _partitioned(url: str) -> str:
    """The scratch database's log grown to PARTITIONS, as `migrate` does."""
    await asyncio.to_thread(upgrade, url, PARTITIONS)
    return url


async def test_a_partitioned_log_is_one_chain_per_partition_checked_alone_or_together(scratch_database: str):
    pool = await quota_log.connect(await _partitioned(scratch_database), size=8)
    try:
        partitions = await quota_log.partition_count(pool)
        assert partitions == PARTITIONS
        quota = _quota(pool, partitions)
        users = [f"part{n}" for n in range(12)]
        for n in range(3):
            await quota.decide([Received(_prompt(user, f"r{n}"), None) for user in users])
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT stream_id, partition FROM quota_events")
            assert len(rows) == 36
            # Every event in its user's partition, the users spread over several.
            assert all(r["partition"] == quota_log.partition_of(r["stream_id"][5:], partitions) for r in rows)
            used = {r["partition"] for r in rows}
            assert len(used) > 2
            report = await audit.verify(conn)
            assert report.broken == [] and report.events == 36 and report.partitions == partitions
            assert set(report.heads) == used

            # Signed heads match; an edit in one partition breaks that one only.
            key = nacl.signing.SigningKey.generate()
            signed = [checkpoints.sign(key, await checkpoints.heads(conn), datetime.now(UTC))]
            assert (await audit.verify(conn, signed, key.verify_key)).broken == []
            victim, other = sorted(used)[:2]
            edited = await conn.fetchval("SELECT min(position) FROM quota_events WHERE partition = $1", victim)
            await conn.execute("ALTER TABLE quota_events DISABLE TRIGGER quota_events_append_only")
            await conn.execute(
                "UPDATE quota_events SET payload = jsonb_set(payload, '{used}', '0') WHERE position = $1", edited
            )
            await conn.execute("ALTER TABLE quota_events ENABLE TRIGGER quota_events_append_only")
            broken = await audit.verify(conn)
            assert broken.broken[0].startswith(f"event at position {edited} ") and "was edited" in broken.broken[0]
            assert (await audit.verify(conn, partition=victim)).broken == broken.broken
            alone = await audit.verify(conn, signed, key.verify_key, partition=other)
            assert alone.broken == [] and alone.partitions == 1
    finally:
        await pool.close()

    by_cli = _kiln("audit", "verify", "--no-checkpoints", "--partition", str(other), database_url=scratch_database)
    assert by_cli.returncode == 0 and "chain intact: " in by_cli.stdout, by_cli.stdout
    replayed = _kiln("audit", "replay", "--partition", str(other), database_url=scratch_database)
    assert replayed.returncode == 0 and "0 not reproduced" in replayed.stdout, replayed.stdout


async def test_processes_that_disagree_on_the_partitions_never_grant_a_user_more_than_the_plan(scratch_database: str):
    """One process still deciding with 1 partition (it started before the log grew) beside
    two that know them all: they take different locks for the same user, and the unique
    stream version is what keeps them from both spending the same image."""
    await _partitioned(scratch_database)
    pools = [await quota_log.connect(scratch_database, size=8) for _ in range(3)]
    try:
        partitions = await quota_log.partition_count(pools[0])
        services = [_quota(pools[0], 1), _quota(pools[1], partitions), _quota(pools[2], partitions)]
        users = [f"race{n}" for n in range(6)]

        async def ask(quota: QuotaService, round_: int) -> None:
            await quota.decide([Received(_prompt(user, f"q{id(quota)}r{round_}"), None) for user in users])

        await asyncio.gather(*(ask(quota, round_) for round_ in range(3) for quota in services))
        async with pools[0].acquire() as conn:
            granted = await conn.fetch(
                "SELECT stream_id, count(*) AS n FROM quota_events WHERE event_type = 'QuotaGranted' GROUP BY 1"
            )
            decided = await conn.fetchval("SELECT count(*) FROM quota_events")
            report = await audit.verify(conn)
    finally:
        for pool in pools:
            await pool.close()
    assert decided == 3 * 3 * len(users)  # every request decided once
    assert {row["stream_id"] for row in granted} == {quota_log.user_stream(user) for user in users}
    assert all(row["n"] == 3 for row in granted), granted  # free: 3 a day, not one more
    assert report.broken == []


async def test_requests_in_progress_count_against_max_active_until_their_outcomes(scratch_database: str):
    """The `capped` plan allows 2 at once: a third waits for an outcome, refused at once."""
    pool = await quota_log.connect(scratch_database)
    config = plans.load(TEST_PLANS)
    quota = QuotaService(pool, None, config, FleetMonitor(config.pressure))
    try:
        async with pool.acquire() as conn:
            await accounts.add(conn, config, "busy", "capped")

        async def ask(*requests: str) -> list:
            decisions, _, _ = await quota.decide([Received(_prompt("busy", r), None) for r in requests])
            return [decisions[("busy", r)] for r in requests]

        first = await ask("r0", "r1", "r2")
        assert [type(d) for d in first] == [QuotaGranted, QuotaGranted, QuotaDenied]
        assert first[2].reason == "concurrency" and first[2].retry_at is not None
        assert isinstance((await ask("r3"))[0], QuotaDenied)  # still two in progress

        await quota.handle_outcome(ImageDelivered(request_id="r0", user_id="busy", image_key="k", render_ms=1))
        assert isinstance((await ask("r4"))[0], QuotaGranted)
        failed = RequestFailed(request_id="r1", user_id="busy", stage="render", reason="error", detail="boom")
        await quota.handle_outcome(failed)  # ends it, and refunds it
        assert isinstance((await ask("r5"))[0], QuotaGranted)
        assert [d.reason for d in await ask("r6")] == ["concurrency"]
        async with pool.acquire() as conn:
            in_progress = await conn.fetch("SELECT request_id FROM quota_active WHERE user_id = 'busy'")
            replayed = await audit.replay(conn)
    finally:
        await pool.close()
    assert sorted(row["request_id"] for row in in_progress) == ["r4", "r5"]
    # The count each decision saw is recorded with it: replay makes the same decisions.
    assert replayed.mismatches == [] and replayed.checked == 7 and replayed.refunds == 1


# -- checkpoints outside the database, and numbers JSONB keeps its own way ---------------


async def _rewrite(url: str, sql: str, from_position: int | None = None) -> None:
    """Tamper as a superuser who also covers their tracks: after `sql`, every hash from
    `from_position` on is recomputed (each after its partition's event before it) and each
    partition's head set to its last event, so the chains alone hold."""
    conn = await quota_log.connect(url, size=1)
    try:
        async with conn.acquire() as c, c.transaction():
            await c.execute("ALTER TABLE quota_events DISABLE TRIGGER quota_events_append_only")
            await c.execute(sql)
            previous: dict[int, str] = {}
            for row in await c.fetch(
                "SELECT * FROM quota_events WHERE position >= $1 ORDER BY position", from_position or 10**9
            ):
                part = row["partition"]
                if part not in previous:
                    previous[part] = (
                        await c.fetchval(
                            "SELECT hash FROM quota_events WHERE partition = $1 AND position < $2"
                            " ORDER BY position DESC LIMIT 1",
                            part,
                            row["position"],
                        )
                        or chain.GENESIS
                    )
                fields = {k: row[k] for k in ("stream_id", "version", "event_type", "request_id", "payload")}
                fields |= {"metadata": row["metadata"], "recorded_at": row["recorded_at"], "prev_hash": previous[part]}
                previous[part] = chain.event_hash(**fields)
                await c.execute(
                    "UPDATE quota_events SET prev_hash = $1, hash = $2 WHERE position = $3",
                    fields["prev_hash"],
                    previous[part],
                    row["position"],
                )
            await reset_heads(c)
            await c.execute("ALTER TABLE quota_events ENABLE TRIGGER quota_events_append_only")
    finally:
        await conn.close()


async def reset_heads(conn: asyncpg.Connection) -> None:
    """Each partition's head set to its last event, as if the log had always ended there."""
    await conn.execute(
        """
        UPDATE quota_chain_head h SET hash = coalesce(last.hash, $1), position = last.position
        FROM quota_chain_head p LEFT JOIN LATERAL (
            SELECT hash, position FROM quota_events e WHERE e.partition = p.partition
            ORDER BY position DESC LIMIT 1
        ) last ON true
        WHERE h.partition = p.partition
        """,
        chain.GENESIS,
    )


async def _checkpoint_file(url: str, folder: Path, positions: tuple[int, ...]) -> list[str]:
    """Sign the log's hashes at `positions` as quota does, and export them with the public key."""
    key = checkpoints.signing_key(folder)
    conn = await asyncpg.connect(url)
    try:
        hashes = dict(await conn.fetch("SELECT position, hash FROM quota_events WHERE position = ANY($1)", positions))
    finally:
        await conn.close()
    signed = [
        checkpoints.sign(key, [checkpoints.Head(0, position, hashes[position])], datetime.now(UTC))
        for position in positions
    ]
    with (folder / "checkpoints.jsonl").open("wb") as file:
        audit.export_checkpoints(signed, file)
    return [
        "--checkpoints",
        str(folder / "checkpoints.jsonl"),
        "--public-key",
        str(folder / checkpoints.PUBLIC_KEY_FILE),
    ]


COVERED_TAMPERING = {
    # The newest two events go, and the chain head is set back to the event before them.
    "newest removed": ("DELETE FROM quota_events WHERE position >= 12", None),
    # user0's r1 grant loses its `used` count; every later hash is recomputed.
    "middle rewritten": ("UPDATE quota_events SET payload = jsonb_set(payload, '{used}', '9') WHERE position = 6", 6),
}


@pytest.mark.parametrize("tampering", COVERED_TAMPERING)
async def test_verify_finds_covered_tracks_against_the_signed_checkpoints(
    scratch_database: str, tmp_path: Path, tampering: str
):
    await _write_log(scratch_database)
    options = await _checkpoint_file(scratch_database, tmp_path, (5, 10, 13))
    intact = _kiln("audit", "verify", *options, database_url=scratch_database)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "3 signed checkpoints match, the newest at position 13" in intact.stdout

    await _rewrite(scratch_database, *COVERED_TAMPERING[tampering])
    alone = _kiln("audit", "verify", "--no-checkpoints", database_url=scratch_database)
    assert alone.returncode == 0, alone.stdout  # the chain alone cannot tell

    broken = _kiln("audit", "verify", *options, database_url=scratch_database)
    assert broken.returncode == 1
    first = broken.stdout.splitlines()[0]
    if tampering == "newest removed":
        assert first.startswith("BROKEN: partition 0 ends at position 11 but the checkpoint signed at"), first
        assert "covers position 13: the newest events were removed" in first
    else:
        assert first.startswith("BROKEN: position 10: its hash"), first
        assert "history was rewritten after position 5, up to position 10" in first


EDGE_NUMBERS = {"negative zero": -0.0, "huge": 1e308, "huge, not round": 1.2345678901234568e17, "tiny": 5e-324}


async def test_numbers_jsonb_keeps_its_own_way_never_raise_a_false_alarm(scratch_database: str):
    pool = await quota_log.connect(scratch_database)
    config = plans.load(TEST_PLANS)
    quota = QuotaService(pool, None, config, FleetMonitor(config.pressure))
    try:
        batch = [
            Received(msgspec.structs.replace(_prompt("edgy", f"r{n}"), strength=number, seed=2**63 - 1), None)
            for n, number in enumerate(EDGE_NUMBERS.values())
        ]
        await quota.decide(batch)  # denied (strength out of range), with the numbers in the log
        # NaN cannot come off the bus (JSON has none), and the log refuses it by name.
        with pytest.raises(chain.NotLoggable, match="strength` is nan"):
            await quota.decide([Received(msgspec.structs.replace(_prompt("edgy", "nan"), strength=float("nan")), None)])
        async with pool.acquire() as conn:
            stored = [row["metadata"]["inputs"]["submission"]["strength"] for row in await _logged(conn, "edgy")]
            report = await audit.verify(conn)
    finally:
        await pool.close()
    assert stored == [0.0, 10**308, 123456789012345680, 5e-324]  # what JSONB gives back
    assert report.broken == [] and report.events == 4
