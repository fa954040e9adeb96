"""The quota event log in Postgres: append-only, one stream per user, optimistic concurrency.

Each row is one decision. `(stream_id, version)` is unique, so two quota replicas deciding
for the same user at once cannot both append version N: the loser gets `Conflict`, reloads
and decides again. A partial unique index on `(stream_id, request_id)` over decisions means
one request can never hold two decisions, whichever replica got it. A trigger refuses
UPDATE and DELETE.
"""

from __future__ import annotations

from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import QuotaDenied, QuotaGranted

metadata = sa.MetaData()

quota_events = sa.Table(
    "quota_events",
    metadata,
    sa.Column("position", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("metadata", JSONB, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("stream_id", "version", name="quota_events_stream_version_key"),
)

Decision = QuotaGranted | QuotaDenied
DECISION_TYPES = ("QuotaGranted", "QuotaDenied")


class Conflict(Exception):
    """Another writer appended to the same stream, or decided the same request, first."""


def user_stream(user_id: str) -> str:
    return f"user:{user_id}"


async def decision_for(conn: AsyncConnection, stream_id: str, request_id: str) -> Decision | None:
    row = await conn.execute(
        sa.select(quota_events.c.payload).where(
            quota_events.c.stream_id == stream_id,
            quota_events.c.request_id == request_id,
            quota_events.c.event_type.in_(DECISION_TYPES),
        )
    )
    payload = row.scalar_one_or_none()
    return None if payload is None else msgspec.convert(payload, Decision)


async def stream_version(conn: AsyncConnection, stream_id: str) -> int:
    """The stream's last version, 0 for a stream with no events yet."""
    row = await conn.execute(
        sa.select(sa.func.coalesce(sa.func.max(quota_events.c.version), 0)).where(
            quota_events.c.stream_id == stream_id
        )
    )
    return int(row.scalar_one())


async def granted_on(conn: AsyncConnection, stream_id: str, day: str) -> int:
    row = await conn.execute(
        sa.select(sa.func.count()).where(
            quota_events.c.stream_id == stream_id,
            quota_events.c.event_type == "QuotaGranted",
            quota_events.c.payload["day"].astext == day,
        )
    )
    return int(row.scalar_one())


async def append(
    conn: AsyncConnection, stream_id: str, version: int, event: Decision, meta: dict[str, Any]
) -> None:
    """Append `event` as `version` of `stream_id`; raise Conflict if someone else did first."""
    try:
        async with conn.begin_nested():
            await conn.execute(
                quota_events.insert().values(
                    stream_id=stream_id,
                    version=version,
                    event_type=type(event).__name__,
                    request_id=event.request_id,
                    payload=msgspec.to_builtins(event),
                    metadata=meta,
                )
            )
    except IntegrityError as error:
        raise Conflict(f"{stream_id} v{version} / {event.request_id}") from error
