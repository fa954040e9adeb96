"""Quota's signed checkpoints on the running platform: published to KILN_AUDIT_CHECKPOINTS
within KILN_CHECKPOINT_AFTER_S of a decision, read back from the stream by `kiln audit
verify` and `export`, and tampering with a copy of the log found against them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import nats.js.errors
import pytest

from infra.platform import Platform
from services.quota import checkpoints
from services.quota import log as quota_log
from shared import subjects
from shared.events import ImageDelivered, QuotaDenied
from shared.settings import PROJECT_ROOT, Settings
from tests.conftest import TEST_PLANS, replaced
from tests.conftest import TestClient as AdminClient  # (as itself, pytest would take it for tests)
from tests.integration.test_quota import _prompt, _rewrite, _wait_for_decisions, reset_heads

pytestmark = pytest.mark.integration

AFTER_S = Settings.checkpoint_after_s  # the default the platform runs with
MARGIN_S = 1.5  # a loaded 2-core machine: the look once a second, a slow commit or publish
STREAM, SUBJECT = subjects.AUDIT_CHECKPOINTS.name, subjects.AUDIT_CHECKPOINT.subject()


@pytest.fixture(autouse=True)
def _own_nats(platform: Platform) -> None:
    if Settings.from_env().nats_url:  # checkpoints are kept for good, each run signs with its own key
        pytest.skip("a shared NATS keeps earlier runs' checkpoints: a new log epoch each run")


def _kiln(platform: Platform, *args: str, database_url: str) -> subprocess.CompletedProcess:
    """The CLI as an operator runs it beside this platform: its data folder (keys,
    credentials) and NATS, so that `audit` reads the checkpoint stream."""
    assert platform.nats_url
    env = os.environ | {
        "KILN_DATABASE_URL": database_url,
        "KILN_DATA_DIR": str(platform.data_dir),
        "KILN_NATS_URL": platform.nats_url,
        "KILN_PLANS": str(TEST_PLANS),
        "COLUMNS": "200",
    }
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


async def _newest_checkpoint(client: AdminClient) -> checkpoints.Checkpoint | None:
    try:
        return checkpoints.decode((await client.js.get_last_msg(STREAM, SUBJECT)).data)
    except nats.js.errors.NotFoundError:
        return None


async def _checkpoint_covering(client: AdminClient, position: int, timeout_s: float) -> checkpoints.Checkpoint:
    deadline = time.monotonic() + timeout_s
    while (found := await _newest_checkpoint(client)) is None or found.position < position:
        assert time.monotonic() < deadline, f"no checkpoint covering position {position} in {timeout_s} s: {found}"
        await asyncio.sleep(0.1)
    return found


@dataclass
class Covered:
    position: int  # the user's newest decision
    recorded_at: datetime
    checkpoint: checkpoints.Checkpoint  # the first one seen covering it
    seen_after_s: float  # from the decision's commit to the test seeing the checkpoint

    @property
    def lag_s(self) -> float:  # from the decision to the checkpoint's signature
        return (self.checkpoint.at - self.recorded_at).total_seconds()


async def _decide_and_wait(client: AdminClient, db: asyncpg.Connection, user: str, images: int = 2) -> Covered:
    """A few decisions for `user` (real requests), then the checkpoint that covers them."""
    for _ in range(images):
        outcome = await client.generate("a red circle", user_id=user)
        assert isinstance(outcome, ImageDelivered | QuotaDenied), outcome
    newest = await db.fetchrow(
        "SELECT position, recorded_at FROM quota_events WHERE stream_id = $1 ORDER BY position DESC LIMIT 1",
        quota_log.user_stream(user),
    )
    checkpoint = await _checkpoint_covering(client, newest["position"], AFTER_S + 10)
    seen_after_s = time.time() - newest["recorded_at"].timestamp()
    return Covered(newest["position"], newest["recorded_at"], checkpoint, seen_after_s)


async def test_quota_checkpoints_a_decision_within_ten_seconds_and_verify_reads_them_from_the_stream(
    platform: Platform, client: AdminClient, db: asyncpg.Connection, user: str, tmp_path: Path
):
    covered = await _decide_and_wait(client, db, user)
    print(f"checkpoint lag: signed {covered.lag_s:.2f} s, seen {covered.seen_after_s:.2f} s after the decision")
    assert 0 <= covered.lag_s <= AFTER_S + MARGIN_S, covered
    # The checkpoint is the head as the table has it, signed with the key beside the data.
    checkpoint = covered.checkpoint
    public_key = checkpoints.public_key_from(platform.data_dir / checkpoints.PUBLIC_KEY_FILE)
    assert checkpoints.signed_by(checkpoint, public_key)
    assert checkpoint.key == bytes(public_key).hex()
    assert (
        await db.fetchval("SELECT hash FROM quota_events WHERE position = $1", checkpoint.position) == checkpoint.hash
    )

    verified = _kiln(platform, "audit", "verify", database_url=platform.database_url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "intact: " in verified.stdout and "signed checkpoints match, the newest at position" in verified.stdout

    exported = tmp_path / "checkpoints.jsonl"
    log = tmp_path / "log.jsonl"
    written = _kiln(
        platform, "audit", "export", "-o", str(log), "--checkpoints", str(exported), database_url=platform.database_url
    )
    assert written.returncode == 0, written.stderr
    from_file = checkpoints.read_file(exported)
    assert checkpoint in from_file and f"exported {len(from_file)} checkpoints" in written.stderr
    assert [c.position for c in from_file] == sorted(c.position for c in from_file)
    again = _kiln(platform, "audit", "verify", "--checkpoints", str(exported), database_url=platform.database_url)
    assert again.returncode == 0 and f"{len(from_file)} signed checkpoints match" in again.stdout, again.stdout


async def _copy_log(platform: Platform, scratch: str, up_to: int) -> None:
    """The platform's log up to `up_to`, copied as it is (positions, partitions, hashes) into
    `scratch`, each partition's head at its last event: a copy to tamper with, the original
    untouched."""
    source, target = await asyncpg.connect(platform.database_url), await asyncpg.connect(scratch)
    try:
        rows = await source.fetch("SELECT * FROM quota_events WHERE position <= $1 ORDER BY position", up_to)
        await target.copy_records_to_table("quota_events", records=rows, columns=list(rows[0].keys()))
        await reset_heads(target)
    finally:
        await source.close()
        await target.close()


TAMPERING = {
    # From the newest checkpointed event on, gone; the chain head set back to the one before.
    "newest removed": lambda newest: (f"DELETE FROM quota_events WHERE position >= {newest}", None),
    # The newest checkpointed event edited, and its hash (and the head) recomputed.
    "newest rewritten": lambda newest: (
        f"UPDATE quota_events SET payload = jsonb_set(payload, '{{user_id}}', '\"mallory\"') WHERE position = {newest}",
        newest,
    ),
}


@pytest.mark.parametrize("tampering", TAMPERING)
async def test_tampering_with_a_copy_of_the_log_is_found_against_the_streams_checkpoints(
    platform: Platform, client: AdminClient, db: asyncpg.Connection, scratch_database: str, user: str, tampering: str
):
    # Two rounds, so that the stream holds an older checkpoint that still matches.
    await _decide_and_wait(client, db, user, images=1)
    await _decide_and_wait(client, db, user, images=1)
    newest = await _newest_checkpoint(client)
    assert newest is not None
    await _copy_log(platform, scratch_database, newest.position)
    intact = _kiln(platform, "audit", "verify", database_url=scratch_database)
    assert intact.returncode == 0, intact.stdout + intact.stderr

    # Where the newest checkpointed event's partition ends once it is gone.
    partition = await db.fetchval("SELECT partition FROM quota_events WHERE position = $1", newest.position)
    before = await db.fetchval(
        "SELECT max(position) FROM quota_events WHERE partition = $1 AND position < $2", partition, newest.position
    )
    await _rewrite(scratch_database, *TAMPERING[tampering](newest.position))
    alone = _kiln(platform, "audit", "verify", "--no-checkpoints", database_url=scratch_database)
    assert alone.returncode == 0, alone.stdout  # the chain alone cannot tell
    broken = _kiln(platform, "audit", "verify", database_url=scratch_database)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    first = broken.stdout.splitlines()[0]
    if tampering == "newest removed":
        ends = f"ends at position {before}" if before else "is empty"
        assert first.startswith(f"BROKEN: partition {partition} {ends} but the checkpoint"), first
        assert f"covers position {newest.position}: the newest events were removed" in first
    else:
        assert first.startswith(f"BROKEN: position {newest.position}: its hash"), first
        assert "history was rewritten after position" in first and f"up to position {newest.position}" in first
    assert "None of the" not in broken.stdout  # older checkpoints match: no new log
    # The platform's own log is untouched.
    assert _kiln(platform, "audit", "verify", database_url=platform.database_url).returncode == 0


async def test_a_reset_database_with_the_old_checkpoints_still_kept_says_how_to_start_a_new_epoch(
    platform: Platform, client: AdminClient, db: asyncpg.Connection, scratch_database: str, user: str
):
    await _decide_and_wait(client, db, user, images=1)
    # scratch_database is what a reset leaves: migrated, empty, the stream as it was.
    reset = _kiln(platform, "audit", "verify", database_url=scratch_database)
    assert reset.returncode == 1
    lines = reset.stdout.splitlines()
    assert lines[0].startswith("BROKEN: the log is empty but the checkpoint signed at"), lines[0]
    note = lines[-1]
    assert note.startswith("None of the ") and "checkpoints in the KILN_AUDIT_CHECKPOINTS stream matches" in note
    assert "this is a new log: the database was reset" in note
    assert "start a new epoch" in note and "nats stream purge KILN_AUDIT_CHECKPOINTS" in note


async def test_the_checkpoint_interval_follows_the_settings(
    platform: Platform, client: AdminClient, db: asyncpg.Connection, user: str
):
    every_two = {"KILN_CHECKPOINT_EVERY": "2", "KILN_CHECKPOINT_AFTER_S": "3600"}
    with replaced(platform, "quota", ("quota-every-two", every_two)):
        # Its first look (at start) signs the head it finds; from there, every two events.
        await client.submit(_prompt(user, "r0"))
        await client.submit(_prompt(user, "r1"))
        started = (await _wait_for_decisions(db, user, 2))[1]["position"]
        await _checkpoint_covering(client, started, timeout_s=2 * checkpoints.POLL_S + 5)
        await client.submit(_prompt(user, "r2"))
        first = (await _wait_for_decisions(db, user, 3))[2]["position"]
        await asyncio.sleep(2 * checkpoints.POLL_S + 1)  # one event: not due, for an hour
        before = await _newest_checkpoint(client)
        assert before is None or before.position < first, before
        await client.submit(_prompt(user, "r3"))
        second = (await _wait_for_decisions(db, user, 4))[3]["position"]
        # Two events: due at the next look (the default, 1000 events or 10 s, would wait 10 s).
        covering = await _checkpoint_covering(client, second, timeout_s=2 * checkpoints.POLL_S + 2)
        assert covering.position >= second
