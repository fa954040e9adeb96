"""Audit tools over the quota log, for `kiln audit …`.

verify   walk each partition's hash chain in position order; name the first event whose
         content or predecessor does not match (edited, removed, inserted or reordered
         rows); then check the table against quota's signed checkpoints (`checkpoints.py`),
         which finds what the chains alone cannot: the newest rows removed, or history
         rewritten with every later hash recomputed. One partition, or all.
replay   rebuild every user's state from the log alone and re-run the recorded policy on
         each decision's recorded inputs; list each decision it does not reproduce. Refunds
         and admin adjustments are folded in and checked too (`_check_refund`,
         `_check_adjustment`). One user, one partition, or all.
export   the events as JSON lines (and, to a file of their own, the checkpoints).
rebuild  drop the usage and bucket projections and rebuild them from the log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import IO, Any

import asyncpg
import msgspec
import nacl.signing

from services.quota import chain, checkpoints, policy
from services.quota import log as quota_log
from services.quota.log_events import QuotaAdjusted, QuotaRefunded, from_payload
from services.quota.plans import Plan, Shedding
from shared.events import PromptSubmitted, QuotaDenied, QuotaGranted

# -- verify -----------------------------------------------------------------------------


@dataclass
class ChainReport:
    events: int = 0
    heads: dict[int, str] = field(default_factory=dict)  # partition → the hash its chain ends with
    last_positions: dict[int, int] = field(default_factory=dict)  # partition → its last event's position
    partitions: int = 0  # checked
    broken: list[str] = field(default_factory=list)  # first one first
    checkpoints: checkpoints.CheckpointReport | None = None  # None: none were given


async def verify(
    conn: asyncpg.Connection,
    signed: list[checkpoints.Checkpoint] | None = None,
    key: nacl.signing.VerifyKey | None = None,
    partition: int | None = None,
) -> ChainReport:
    """Walk the chains (of one `partition`, if given); with `signed` checkpoints and
    quota's public `key`, check the table against them too (their problems come after the
    chains')."""
    wanted = {head.position for checkpoint in signed or () for head in checkpoint.covered()}
    hashes: dict[int, str] = {}  # of the checkpointed positions only: memory stays flat
    async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
        recorded = {row["partition"]: row["hash"] for row in await conn.fetch("SELECT * FROM quota_chain_head")}
        report = await _walk_chains(conn, wanted, hashes, partition)
    if partition is not None and partition not in recorded:
        report.broken.append(f"the log has no partition {partition} (it has {len(recorded)})")
    for part, head in sorted(recorded.items()):
        walked = report.heads.get(part, chain.GENESIS)
        if (partition is None or part == partition) and walked != head:
            report.broken.append(
                f"partition {part} ends with hash {walked[:12]}… but its chain head names {head[:12]}…:"
                " the newest events were removed"
            )
    strays = set(report.heads) - set(recorded)
    if strays:
        report.broken.append(f"events in partitions the log does not have: {sorted(strays)}")
    report.partitions = 1 if partition is not None else len(recorded)
    if signed is not None and key is not None:
        report.checkpoints = checkpoints.check(signed, key, hashes, report.last_positions, partition)
        report.broken += report.checkpoints.broken
    return report


async def _walk_chains(
    conn: asyncpg.Connection, wanted: set[int], hashes: dict[int, str], partition: int | None
) -> ChainReport:
    """Every event in position order, each checked against the one before it in its
    partition. Walking one partition sees only part of a stream whose user moved to it when
    the partitions grew, so there a stream's versions need only rise, not follow on by one."""
    report = ChainReport()
    previous_positions: dict[int, int] = {}
    versions: dict[str, int] = {}
    async for row in quota_log.read_events(conn, partition=partition):
        report.events += 1
        part = row["partition"]
        if row["position"] in wanted:
            hashes[row["position"]] = row["hash"]
        where = f"event at position {row['position']} ({row['event_type']} {row['stream_id']} v{row['version']})"
        if row["prev_hash"] != report.heads.get(part, chain.GENESIS):
            before = previous_positions.get(part)
            after = f"position {before}" if before else f"the start of partition {part}"
            report.broken.append(
                f"{where}: its predecessor hash does not match the event before it ({after}):"
                " an event was removed, inserted or reordered here"
            )
        if _recomputed_hash(row) != row["hash"]:
            report.broken.append(f"{where}: its content does not match its hash: the row was edited")
        last_version = versions.get(row["stream_id"], 0)
        if row["version"] != last_version + 1 and (partition is None or row["version"] <= last_version):
            report.broken.append(f"{where}: expected version {last_version + 1} of its stream")
        versions[row["stream_id"]] = row["version"]
        report.heads[part], previous_positions[part] = row["hash"], row["position"]
    report.last_positions = previous_positions
    return report


def _recomputed_hash(row: asyncpg.Record) -> str:
    return chain.event_hash(
        stream_id=row["stream_id"],
        version=row["version"],
        event_type=row["event_type"],
        request_id=row["request_id"],
        payload=row["payload"],
        metadata=row["metadata"],
        recorded_at=row["recorded_at"],
        prev_hash=row["prev_hash"],
    )


# -- replay -----------------------------------------------------------------------------


@dataclass
class ReplayReport:
    events: int = 0
    checked: int = 0  # decisions re-run
    refunds: int = 0  # refunds checked
    adjustments: int = 0  # admin adjustments checked
    skipped: int = 0  # decisions of a policy version this code cannot re-run
    mismatches: list[str] = field(default_factory=list)


async def replay(
    conn: asyncpg.Connection, user_id: str | None = None, since: datetime | None = None, partition: int | None = None
) -> ReplayReport:
    """Re-run the policy over the log. Users' states are independent, so `user_id` narrows
    the replay to one stream and `partition` to one partition's users (exact while the
    partitions never grew; after, a user's first events may be in another: replay all);
    `since` checks only decisions from then on (the state before is still rebuilt from the
    whole history)."""
    report = ReplayReport()
    states: dict[str, policy.UserState] = {}
    granted: dict[tuple[str, str], str] = {}  # (user, request) → the day of its grant
    refunded: set[tuple[str, str]] = set()
    async for row in quota_log.read_events(conn, user_id, partition=partition):
        report.events += 1
        event = from_payload(row["payload"])
        state = states.setdefault(event.user_id, policy.UserState())
        key = (event.user_id, event.request_id)
        problem = None
        if isinstance(event, QuotaGranted):
            granted[key] = event.day
        elif isinstance(event, QuotaRefunded):
            report.refunds += 1
            problem = _check_refund(event, granted.get(key), key in refunded)
            refunded.add(key)
        elif isinstance(event, QuotaAdjusted):
            report.adjustments += 1
            problem = _check_adjustment(event)
        if problem:
            report.mismatches.append(f"position {row['position']} ({event.user_id}/{event.request_id}): {problem}")
        if isinstance(event, QuotaGranted | QuotaDenied) and (since is None or event.decided_at >= since):
            if row["metadata"].get("policy_version") not in policy.REPLAYABLE_VERSIONS:
                report.skipped += 1
            else:
                report.checked += 1
                problem = _replay_decision(event, row["metadata"], state)
                if problem:
                    report.mismatches.append(
                        f"position {row['position']} ({event.user_id}/{event.request_id}): {problem}"
                    )
        policy.apply(state, event)
    return report


def _replay_decision(recorded: QuotaGranted | QuotaDenied, meta: dict[str, Any], state: policy.UserState) -> str | None:
    inputs = meta["inputs"]
    day = policy.utc_day(recorded.decided_at)
    # The state the service saw must be the state the log implies.
    seen = msgspec.convert(inputs["state_before"], policy.UserState)
    if seen.on(day) != state.on(day) or seen.bucket != state.bucket:
        return f"the service saw {_state_text(seen, day)} but the log implies {_state_text(state, day)}"
    again = policy.decide(
        msgspec.convert(inputs["submission"], PromptSubmitted),
        recorded.plan,
        msgspec.convert(inputs["plan"], Plan),
        state,
        meta["pressure"],
        msgspec.convert(inputs["shedding"], Shedding),
        recorded.decided_at,
        msgspec.convert(inputs.get("pricing", {}), policy.Pricing),
        inputs.get("active", 0),
    )
    want, got = msgspec.to_builtins(recorded), msgspec.to_builtins(again)
    if want != got:
        fields = sorted(key for key in want.keys() | got.keys() if want.get(key) != got.get(key))
        return "; ".join(f"{key}: recorded {want.get(key)!r}, policy gives {got.get(key)!r}" for key in fields)
    return None


def _check_refund(refund: QuotaRefunded, grant_day: str | None, again: bool) -> str | None:
    """A refund gives back one granted image: it must follow a grant of the same request,
    on that grant's day, once."""
    if grant_day is None:
        return "a refund, but no grant of this request comes before it"
    if again:
        return "a second refund of the same request"
    if refund.day != grant_day:
        return f"a refund on {refund.day}, but the request was granted on {grant_day}"
    return None


def _check_adjustment(adjusted: QuotaAdjusted) -> str | None:
    """An admin adjustment (`kiln accounts grant`): a UTC day, a non-zero number of images,
    someone who made it, and its own `adjust-…` id."""
    try:
        date.fromisoformat(adjusted.day)
    except ValueError:
        return f"an adjustment on {adjusted.day!r}, which is not a YYYY-MM-DD day"
    if adjusted.images == 0:
        return "an adjustment of 0 images"
    if not adjusted.by:
        return "an adjustment that names nobody in `by`"
    if not adjusted.request_id.startswith("adjust-"):
        return f"an adjustment whose id {adjusted.request_id!r} is not an `adjust-…` id"
    return None


def _state_text(state: policy.UserState, day: str) -> str:
    usage = state.on(day)
    return f"used {usage.used} (+{usage.extra}) with bucket {state.bucket.tokens}"


# -- export -----------------------------------------------------------------------------


async def export(
    conn: asyncpg.Connection, out: IO[str], user_id: str | None = None, since: datetime | None = None
) -> int:
    count = 0
    async for row in quota_log.read_events(conn, user_id):
        if since is not None and row["recorded_at"] < since:
            continue
        record = dict(row)
        record["recorded_at"] = chain.canonical_time(row["recorded_at"])
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def export_checkpoints(signed: list[checkpoints.Checkpoint], out: IO[bytes]) -> int:
    """The checkpoints as JSON lines, oldest first: what `kiln audit verify --checkpoints` reads."""
    for checkpoint in sorted(signed, key=lambda c: c.position):
        out.write(checkpoints.encode(checkpoint) + b"\n")
    return len(signed)


# -- rebuild ----------------------------------------------------------------------------


async def rebuild_projections(pool: asyncpg.Pool) -> int:
    """Drop the usage and bucket projections and fold the whole log into them again,
    holding the append lock so no decision is made meanwhile. Returns the users rebuilt."""
    async with quota_log.appending_everywhere(pool) as conn:
        states: dict[str, policy.UserState] = {}
        async for row in quota_log.read_events(conn):  # in the appender's snapshot
            event = from_payload(row["payload"])
            policy.apply(states.setdefault(event.user_id, policy.UserState()), event)
        await conn.execute("TRUNCATE quota_usage, quota_buckets")
        usage = [
            (user, day, u.granted, u.refunded, u.extra) for user, s in states.items() for day, u in s.usage.items()
        ]
        await conn.copy_records_to_table(
            "quota_usage", records=usage, columns=["user_id", "day", "granted", "refunded", "extra"]
        )
        buckets = [(user, s.bucket.tokens, s.bucket.at) for user, s in states.items() if s.bucket.at is not None]
        await conn.copy_records_to_table("quota_buckets", records=buckets, columns=["user_id", "tokens", "at"])
    return len(states)
