"""The quota event log in Postgres: append-only, one stream per user, hash-chained.

Tables (migrations in `migrations/`):
  quota_events   the log. `position` is global, `(stream_id, version)` unique per user, and
                 a trigger refuses UPDATE, DELETE and TRUNCATE. Each row's `hash` covers
                 its content and `prev_hash`, the hash of the row before it.
  quota_usage    projection: images granted / refunded / added by an admin, per user and
                 UTC day. Written in the same transaction as the events; rebuildable.
  quota_buckets  projection: each user's rate-limit bucket after their last grant.
  quota_outbox   decisions committed but not yet known to be on NATS (the relay's work).

Appends are serialised by a transaction-scoped advisory lock: the chain needs one order,
and holding the lock from reading the user's state to commit means two quota processes
can never both spend the same user's last image. `(stream_id, version)` stays unique as
the database's own guard; a conflict there rolls the batch back and it is decided again.
Decisions are batched, so the lock is taken once per batch, not once per request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asyncpg
import msgspec

from services.quota import chain
from services.quota.events import DECISION_TYPES, Decision, LogEvent, from_payload
from services.quota.policy import Bucket, Usage, UserState, apply
from services.quota.policy import utc_day as policy_day

APPEND_LOCK = 0x6B696C6E_0001  # the advisory lock every appender takes ("kiln", 1)


class Conflict(Exception):
    """Another writer appended the same stream version, or decided the same request."""


def user_stream(user_id: str) -> str:
    return f"user:{user_id}"


def user_of(stream_id: str) -> str:
    return stream_id.removeprefix("user:")


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSONB in and out as Python objects.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(database_url: str, *, size: int = 4) -> asyncpg.Pool:
    return await asyncpg.create_pool(database_url, min_size=1, max_size=size, init=_init_connection)


@dataclass
class Entry:
    """An event to append, with its metadata (request inputs, trace id, policy version…)."""

    event: LogEvent
    metadata: dict[str, Any]


class Appender:
    """Appends to the log inside a transaction that holds the append lock."""

    def __init__(self, conn: asyncpg.Connection, head: str) -> None:
        self.conn = conn
        self.head = head  # the hash of the last event

    async def append(self, entries: list[Entry]) -> list[int]:
        """Append the entries in order, keep the projections in step and queue decisions
        for the outbox; returns their positions."""
        if not entries:
            return []
        streams = sorted({user_stream(entry.event.user_id) for entry in entries})
        versions = dict(
            await self.conn.fetch(
                "SELECT stream_id, max(version) FROM quota_events"
                " WHERE stream_id = ANY($1::text[]) GROUP BY stream_id",
                streams,
            )
        )
        now = datetime.now(timezone.utc)
        rows = []
        for entry in entries:
            stream = user_stream(entry.event.user_id)
            versions[stream] = versions.get(stream, 0) + 1
            row = dict(
                stream_id=stream,
                version=versions[stream],
                event_type=type(entry.event).__name__,
                request_id=entry.event.request_id,
                payload=msgspec.to_builtins(entry.event),
                metadata=entry.metadata,
                recorded_at=now,
                prev_hash=self.head,
            )
            self.head = chain.event_hash(**row)
            rows.append((*row.values(), self.head))
        try:
            positions = await self.conn.fetch(
                """
                INSERT INTO quota_events
                    (stream_id, version, event_type, request_id, payload, metadata,
                     recorded_at, prev_hash, hash)
                SELECT s, v, t, r, p, m, at, prev, h
                FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::jsonb[],
                            $6::jsonb[], $7::timestamptz[], $8::text[], $9::text[])
                     WITH ORDINALITY AS x(s, v, t, r, p, m, at, prev, h, n)
                ORDER BY n
                RETURNING position
                """,
                *map(list, zip(*rows)),
            )
        except asyncpg.UniqueViolationError as error:
            raise Conflict(str(error)) from error
        positions = sorted(row["position"] for row in positions)
        await self._project([entry.event for entry in entries])
        decided = [p for p, entry in zip(positions, entries) if type(entry.event).__name__ in DECISION_TYPES]
        await self.conn.execute(
            "INSERT INTO quota_outbox (position) SELECT unnest($1::bigint[])", decided
        )
        return positions

    async def _project(self, events: list[LogEvent]) -> None:
        """Fold the events into the projections with the policy's own `apply`, so the
        projections are what `audit replay` rebuilds from the log."""
        days = {(event.user_id, getattr(event, "day", None) or _day_of(event)) for event in events}
        states = {user: state for user, (_, state) in (await user_states(self.conn, days)).items()}
        for event in events:
            apply(states.setdefault(event.user_id, UserState()), event)
        usage = {(user, day): u for user, state in states.items() for day, u in state.usage.items()}
        buckets = {user: state.bucket for user, state in states.items() if state.bucket.at is not None}
        if usage:
            await self.conn.execute(
                """
                INSERT INTO quota_usage (user_id, day, granted, refunded, extra)
                SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::int[])
                ON CONFLICT (user_id, day) DO UPDATE SET
                    granted = excluded.granted, refunded = excluded.refunded, extra = excluded.extra
                """,
                [user for user, _ in usage], [day for _, day in usage],
                [u.granted for u in usage.values()], [u.refunded for u in usage.values()],
                [u.extra for u in usage.values()],
            )
        if buckets:
            await self.conn.execute(
                """
                INSERT INTO quota_buckets (user_id, tokens, at)
                SELECT * FROM unnest($1::text[], $2::float8[], $3::timestamptz[])
                ON CONFLICT (user_id) DO UPDATE SET tokens = excluded.tokens, at = excluded.at
                """,
                list(buckets), [b.tokens for b in buckets.values()], [b.at for b in buckets.values()],
            )


def _day_of(event: LogEvent) -> str:
    return policy_day(event.decided_at)  # a denial: it changes no usage, any day will do


@asynccontextmanager
async def appending(pool: asyncpg.Pool) -> AsyncIterator[Appender]:
    """A transaction holding the append lock; reads inside it see every earlier append."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
        # A statement of its own: its snapshot is taken after the lock was granted.
        head = await conn.fetchval("SELECT hash FROM quota_events ORDER BY position DESC LIMIT 1")
        yield Appender(conn, head or chain.GENESIS)


async def user_states(
    conn: asyncpg.Connection, users_on_days: Iterable[tuple[str, str]]
) -> dict[str, tuple[str | None, UserState]]:
    """Each user's account plan (None: no account) and state on the given UTC days, from
    the projections."""
    pairs = list(set(users_on_days))
    rows = await conn.fetch(
        """
        SELECT d.user_id, d.day, a.plan, q.granted, q.refunded, q.extra, b.tokens, b.at
        FROM unnest($1::text[], $2::text[]) AS d(user_id, day)
        LEFT JOIN accounts a ON a.user_id = d.user_id
        LEFT JOIN quota_usage q ON q.user_id = d.user_id AND q.day = d.day
        LEFT JOIN quota_buckets b ON b.user_id = d.user_id
        """,
        [user for user, _ in pairs],
        [day for _, day in pairs],
    )
    states: dict[str, tuple[str | None, UserState]] = {}
    for row in rows:
        _, state = states.setdefault(row["user_id"], (row["plan"], UserState(bucket=Bucket(row["tokens"], row["at"]))))
        if row["granted"] is not None:
            state.usage[row["day"]] = Usage(row["granted"], row["refunded"], row["extra"])
    return states


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
            "SELECT 1 FROM quota_events WHERE stream_id = $1 AND request_id = $2"
            " AND event_type = 'QuotaRefunded'",
            user_stream(user_id),
            request_id,
        )
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
async def unpublished(
    pool: asyncpg.Pool, older_than_s: float, limit: int = 500
) -> AsyncIterator[list[Decision]]:
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
    conn: asyncpg.Connection, user_id: str | None = None, batch: int = 5000
) -> AsyncIterator[asyncpg.Record]:
    """Every event (of one user, if given) in position order."""
    where = "WHERE stream_id = $1" if user_id else ""
    args = [user_stream(user_id)] if user_id else []
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        async for row in conn.cursor(
            f"SELECT * FROM quota_events {where} ORDER BY position", *args, prefetch=batch
        ):
            yield row
