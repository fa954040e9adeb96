"""The quota event log in Postgres: append-only, one stream per user, hash-chained in partitions.

Tables (migrations in `migrations/`):
  quota_events   the log. `position` is global, `(stream_id, version)` unique per user, and
                 a trigger refuses UPDATE, DELETE and TRUNCATE. Each row belongs to one
                 partition; its `hash` covers its content and `prev_hash`, the hash of the
                 row before it in its partition.
  quota_usage    projection: images granted / refunded / added by an admin, per user and
                 UTC day. Written in the same transaction as the events; rebuildable.
  quota_buckets  projection: each user's rate-limit bucket after their last grant.
  quota_outbox   decisions committed but not yet known to be on NATS (the relay's work).
  quota_active   requests granted and not yet ended, per user (a plan's `max_active`):
                 added with each grant, removed when quota hears the request's outcome.
  quota_chain_head  one row per partition: its last event's hash and position; locking it
                 is that partition's append lock.

A user's events all go to one partition (`partition_of`, a stable hash of the user id).
Appends to a partition are serialised by the row lock on its head: the chain needs one
order, and holding the lock from reading the user's state to commit means two quota
processes can never both spend the same user's last image. Users of different partitions
do not wait for each other. `(stream_id, version)` stays unique as the database's own
guard (it also covers processes that disagree on the number of partitions for a moment,
after it grew); a conflict there rolls the batch back and it is decided again. Decisions
are batched, so each partition's lock is taken once per batch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from services.quota import chain
from services.quota.log_events import Decision, LogEvent, from_payload
from services.quota.policy import Bucket, Usage, UserState, apply
from services.quota.policy import utc_day as policy_day

# A granted request whose outcome quota never hears (lost beyond every retry) stops
# counting against its user's `max_active` after this: the limit bounds, it never locks out.
ACTIVE_FOR = timedelta(minutes=15)


class Conflict(Exception):
    """Another writer appended the same stream version, or decided the same request."""


def user_stream(user_id: str) -> str:
    return f"user:{user_id}"


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of a user's events: the same in every process and after restarts
    (unlike Python's salted `hash`)."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


async def partition_count(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """How many partitions the log has: one head row each (`migrate` adds them)."""
    return await conn.fetchval("SELECT count(*) FROM quota_chain_head")


def _to_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSONB in and out as Python objects.
    await conn.set_type_codec("jsonb", encoder=_to_json, decoder=msgspec.json.decode, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """No reset when a connection goes back to the pool: every use here ends its own
    transaction and leaves no session state, and the reset costs a round trip."""


async def connect(database_url: str, *, size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        database_url, min_size=1, max_size=size, init=_init_connection, reset=_keep_session
    )


@dataclass
class Entry:
    """An event to append, with its metadata (request inputs, trace id, policy version…)."""

    event: LogEvent
    metadata: dict[str, Any]


@dataclass
class UserRecord:
    """What the log knows of a user when deciding: plan, state and stream version."""

    plan: str | None  # the account's plan; None: no account (the default plan)
    state: UserState  # from the projections
    version: int  # the user's stream's last version, 0 if none
    active: int = 0  # requests granted and not yet ended


class Appender:
    """Appends to one partition of the log inside a transaction that holds its lock."""

    def __init__(self, conn: asyncpg.Connection, partition: int, head: str, lock_wait_s: float = 0.0) -> None:
        self.conn = conn
        self.partition = partition
        self.head = head  # the hash of the partition's last event
        self.lock_wait_s = lock_wait_s  # how long taking the lock took

    async def users(self, users_on_days: Iterable[tuple[str, str]]) -> dict[str, UserRecord]:
        return await user_records(self.conn, users_on_days)

    async def append(self, entries: list[Entry], users: dict[str, UserRecord] | None = None) -> list[int]:
        """Append the entries in order, with the projections and the outbox, in one
        statement; returns their positions.

        `users`: the users' records with these entries already applied to their states
        (as the decision code has them). Without it, they are loaded and applied here."""
        if not entries:
            return []
        if users is None:
            users = await self.users({(e.event.user_id, _day_of(e.event)) for e in entries})
            for entry in entries:
                apply(users[entry.event.user_id].state, entry.event)
        versions = {user: record.version for user, record in users.items()}
        now = datetime.now(UTC)
        rows = []
        for entry in entries:
            user = entry.event.user_id
            versions[user] += 1
            row = dict(
                stream_id=user_stream(user),
                version=versions[user],
                event_type=type(entry.event).__name__,
                request_id=entry.event.request_id,
                payload=msgspec.to_builtins(entry.event),
                metadata=entry.metadata,
                recorded_at=now,
                prev_hash=self.head,
            )
            self.head = chain.event_hash(**row)
            rows.append((*row.values(), self.head, self.partition))
        touched = {entry.event.user_id for entry in entries}
        usage = [
            (user, day, u.granted, u.refunded, u.extra)
            for user in touched
            for day, u in users[user].state.usage.items()
        ]
        buckets = [(user, users[user].state.bucket) for user in touched if users[user].state.bucket.at]
        try:
            positions = await self.conn.fetch(
                APPEND,
                *map(list, zip(*rows, strict=True)),
                *map(list, zip(*usage, strict=True)) if usage else ([],) * 5,
                [user for user, _ in buckets],
                [b.tokens for _, b in buckets],
                [b.at for _, b in buckets],
                self.head,
                self.partition,
            )
        except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError) as error:
            # (A deadlock needs two appenders writing the same users under different locks:
            # processes that disagree on the partitions for a moment. Either way: decide again.)
            raise Conflict(str(error)) from error
        return sorted(row["position"] for row in positions)


# The events, the projections (absolute values, computed by the policy's own `apply`, so
# they are what `audit rebuild` would make), the outbox and the partition's head: one
# statement, one round trip.
APPEND = """
WITH events AS (
    INSERT INTO quota_events
        (stream_id, version, event_type, request_id, payload, metadata, recorded_at, prev_hash, hash, partition)
    SELECT s, v, t, r, p, m, at, prev, h, part
    FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
                $7::timestamptz[], $8::text[], $9::text[], $10::smallint[])
         WITH ORDINALITY AS x(s, v, t, r, p, m, at, prev, h, part, n)
    ORDER BY n
    RETURNING position, event_type, stream_id, request_id
), outbox AS (
    INSERT INTO quota_outbox (position)
    SELECT position FROM events WHERE event_type IN ('QuotaGranted', 'QuotaDenied')
), active AS (
    INSERT INTO quota_active (user_id, request_id)
    SELECT substr(stream_id, 6), request_id FROM events  -- stream_id: 'user:' || user id
    WHERE event_type = 'QuotaGranted'
    ON CONFLICT DO NOTHING
), usage AS (
    INSERT INTO quota_usage (user_id, day, granted, refunded, extra)
    SELECT * FROM unnest($11::text[], $12::text[], $13::int[], $14::int[], $15::int[])
    ON CONFLICT (user_id, day) DO UPDATE SET
        granted = excluded.granted, refunded = excluded.refunded, extra = excluded.extra
), buckets AS (
    INSERT INTO quota_buckets (user_id, tokens, at)
    SELECT * FROM unnest($16::text[], $17::float8[], $18::timestamptz[])
    ON CONFLICT (user_id) DO UPDATE SET tokens = excluded.tokens, at = excluded.at
), head AS (
    UPDATE quota_chain_head SET hash = $19, position = (SELECT max(position) FROM events)
    WHERE partition = $20
)
SELECT position FROM events
"""


def _day_of(event: LogEvent) -> str:
    """The UTC day whose usage the event changes (a denial changes none: its own day)."""
    return getattr(event, "day", None) or policy_day(event.decided_at)


@asynccontextmanager
async def appending(pool: asyncpg.Pool, partition: int) -> AsyncIterator[Appender]:
    """A transaction holding a partition's append lock: its head's row. Every statement
    after it sees every earlier append (in READ COMMITTED each statement takes a new
    snapshot, and a locked row is re-read at its newest version)."""
    async with pool.acquire() as conn, conn.transaction():
        asked = time.perf_counter()
        head = await conn.fetchval("SELECT hash FROM quota_chain_head WHERE partition = $1 FOR UPDATE", partition)
        if head is None:
            raise ValueError(f"the quota log has no partition {partition}")
        yield Appender(conn, partition, head, time.perf_counter() - asked)


@asynccontextmanager
async def appending_everywhere(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A transaction holding every partition's lock (in partition order, as no appender
    waits on two, so it cannot deadlock with one): nothing is appended meanwhile."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT partition FROM quota_chain_head ORDER BY partition FOR UPDATE")
        yield conn


async def user_records(conn: asyncpg.Connection, users_on_days: Iterable[tuple[str, str]]) -> dict[str, UserRecord]:
    """Each user's account plan, state on the given UTC days, and stream version."""
    pairs = list(set(users_on_days))
    rows = await conn.fetch(
        """
        SELECT d.user_id, d.day, a.plan, q.granted, q.refunded, q.extra, b.tokens, b.at,
               (SELECT coalesce(max(version), 0) FROM quota_events e
                WHERE e.stream_id = d.stream_id) AS version,
               (SELECT count(*) FROM quota_active r
                WHERE r.user_id = d.user_id AND r.granted_at > now() - $4::interval) AS active
        FROM unnest($1::text[], $2::text[], $3::text[]) AS d(user_id, day, stream_id)
        LEFT JOIN accounts a ON a.user_id = d.user_id
        LEFT JOIN quota_usage q ON q.user_id = d.user_id AND q.day = d.day
        LEFT JOIN quota_buckets b ON b.user_id = d.user_id
        """,
        [user for user, _ in pairs],
        [day for _, day in pairs],
        [user_stream(user) for user, _ in pairs],
        ACTIVE_FOR,
    )
    records: dict[str, UserRecord] = {}
    for row in rows:
        state = UserState(bucket=Bucket(row["tokens"], row["at"]))
        record = records.setdefault(row["user_id"], UserRecord(row["plan"], state, row["version"], row["active"]))
        if row["granted"] is not None:
            record.state.usage[row["day"]] = Usage(row["granted"], row["refunded"], row["extra"])
    return records


async def decisions_for(
    conn: asyncpg.Connection, requests: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], Decision]:
    """The decisions already recorded for these (user, request) pairs."""
    pairs = list(requests)
    rows = await conn.fetch(
        """
        SELECT payload FROM quota_events
        WHERE (stream_id, request_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
          AND event_type IN ('QuotaGranted', 'QuotaDenied')
        """,
        [user_stream(user) for user, _ in pairs],
        [request for _, request in pairs],
    )
    decisions = [from_payload(row["payload"]) for row in rows]
    return {(d.user_id, d.request_id): d for d in decisions}


async def refund_recorded(conn: asyncpg.Connection, user_id: str, request_id: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM quota_events WHERE stream_id = $1 AND request_id = $2 AND event_type = 'QuotaRefunded'",
            user_stream(user_id),
            request_id,
        )
    )


async def ended(pool: asyncpg.Pool, user_id: str, request_id: str) -> None:
    """The request has its outcome: it no longer counts against the user's `max_active`;
    nor does any of the user's requests granted longer ago than ACTIVE_FOR."""
    await pool.execute(
        "DELETE FROM quota_active WHERE user_id = $1 AND (request_id = $2 OR granted_at < now() - $3::interval)",
        user_id,
        request_id,
        ACTIVE_FOR,
    )


# -- the outbox -------------------------------------------------------------------------


async def published(pool: asyncpg.Pool, positions: list[int]) -> None:
    """The decisions at these positions are on NATS: the relay need not send them."""
    async with pool.acquire() as conn, conn.transaction():
        # Losing this delete in a crash costs only a duplicate publish, which JetStream
        # drops; so it need not wait for its own fsync.
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute("DELETE FROM quota_outbox WHERE position = ANY($1::bigint[])", positions)


@asynccontextmanager
async def unpublished(pool: asyncpg.Pool, older_than_s: float, limit: int = 500) -> AsyncIterator[list[Decision]]:
    """Decisions committed at least `older_than_s` ago and still in the outbox, locked so
    that two relays never take the same ones; they leave the outbox when the block ends."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """
            SELECT o.position, e.payload FROM quota_outbox o
            JOIN quota_events e ON e.position = o.position
            WHERE o.created_at < now() - make_interval(secs => $1)
            ORDER BY o.position LIMIT $2
            FOR UPDATE OF o SKIP LOCKED
            """,
            older_than_s,
            limit,
        )
        yield [from_payload(row["payload"]) for row in rows]
        await conn.execute(
            "DELETE FROM quota_outbox WHERE position = ANY($1::bigint[])",
            [row["position"] for row in rows],
        )


# -- reading the log --------------------------------------------------------------------


async def read_events(
    conn: asyncpg.Connection, user_id: str | None = None, batch: int = 5000, partition: int | None = None
) -> AsyncIterator[asyncpg.Record]:
    """Every event (of one user, or of one partition, if given) in position order."""
    conditions, args = [], []
    if user_id:
        args.append(user_stream(user_id))
        conditions.append(f"stream_id = ${len(args)}")
    if partition is not None:
        args.append(partition)
        conditions.append(f"partition = ${len(args)}")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    query = f"SELECT * FROM quota_events {where} ORDER BY position"
    if conn.is_in_transaction():  # the caller's snapshot
        async for row in conn.cursor(query, *args, prefetch=batch):
            yield row
        return
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        async for row in conn.cursor(query, *args, prefetch=batch):
            yield row
