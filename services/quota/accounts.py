"""Accounts (user → plan) and admin grants, for `kiln accounts …`.

An account is plain mutable state, not history: the plan a decision was made under is
recorded with the decision itself. An admin grant is history, so it is an event in the
log (QuotaAdjusted), appended like any decision.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg

from services.quota import log as quota_log
from services.quota import policy
from services.quota.log_events import QuotaAdjusted
from services.quota.plans import Config
from shared.events import ID_PATTERN


class AccountError(Exception):
    """A request an operator can fix: an unknown plan, a bad user id, a missing account."""


def _check(config: Config, user_id: str, plan: str | None = None) -> None:
    if not ID_PATTERN.match(user_id):
        raise AccountError(f"user id must match {ID_PATTERN.pattern}: {user_id!r}")
    if plan is not None and plan not in config.plans:
        raise AccountError(f"unknown plan {plan!r}; the plans are: {', '.join(config.plans)}")


async def add(conn: asyncpg.Connection, config: Config, user_id: str, plan: str) -> None:
    _check(config, user_id, plan)
    try:
        await conn.execute("INSERT INTO accounts (user_id, plan) VALUES ($1, $2)", user_id, plan)
    except asyncpg.UniqueViolationError:
        raise AccountError(f"{user_id} has an account already; use `kiln accounts set-plan`") from None


async def set_plan(conn: asyncpg.Connection, config: Config, user_id: str, plan: str) -> None:
    _check(config, user_id, plan)
    status = await conn.execute("UPDATE accounts SET plan = $2, updated_at = now() WHERE user_id = $1", user_id, plan)
    if status == "UPDATE 0":
        raise AccountError(f"{user_id} has no account; use `kiln accounts add`")


async def listing(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every account with today's usage."""
    return await conn.fetch(
        """
        SELECT a.user_id, a.plan, coalesce(u.granted - u.refunded, 0) AS used_today,
               coalesce(u.extra, 0) AS extra_today, a.updated_at
        FROM accounts a LEFT JOIN quota_usage u ON u.user_id = a.user_id AND u.day = $1
        ORDER BY a.user_id
        """,
        policy.utc_day(datetime.now(UTC)),
    )


async def usage_on(conn: asyncpg.Connection, day: str) -> list[asyncpg.Record]:
    """Everyone who used images on a UTC day (`YYYY-MM-DD`), or was given extra ones, from
    the usage projection (kept with the log, rebuilt from it by `audit rebuild`): images
    granted, refunded and added by an admin, and the account's plan (None: no account,
    so the default plan). Most used first."""
    return await conn.fetch(
        """
        SELECT u.user_id, a.plan, u.granted, u.refunded, u.extra
        FROM quota_usage u LEFT JOIN accounts a ON a.user_id = u.user_id
        WHERE u.day = $1 AND (u.granted > 0 OR u.extra <> 0)
        ORDER BY u.granted - u.refunded DESC, u.user_id
        """,
        day,
    )


async def over_soft_cap(conn: asyncpg.Connection, day: str) -> list[asyncpg.Record]:
    """Everyone granted images past their plan's soft cap on a UTC day, from the log: the
    grants flagged `over_soft_cap` (the decisions that put them there), their plan, the
    highest count reached, and since when. Most flagged first. (A scan of the day's
    grants: an operator's command, not a hot path.)"""
    return await conn.fetch(
        """
        SELECT substr(stream_id, 6) AS user_id, payload->>'plan' AS plan, count(*) AS flagged,
               max((payload->>'used')::int) AS used, min(recorded_at) AS since,
               array_agg(request_id ORDER BY position) AS requests
        FROM quota_events
        WHERE event_type = 'QuotaGranted' AND payload->>'day' = $1
              AND (payload->>'over_soft_cap')::boolean
        GROUP BY 1, 2
        ORDER BY 3 DESC, 1
        """,
        day,
    )


async def grant(
    pool: asyncpg.Pool, config: Config, user_id: str, images: int, by: str, note: str = ""
) -> QuotaAdjusted:
    """Allow `user_id` `images` more images today (an admin grant, logged)."""
    _check(config, user_id)
    if images == 0:
        raise AccountError("a grant of 0 images changes nothing")
    adjusted = QuotaAdjusted(
        request_id=f"adjust-{uuid.uuid4().hex[:12]}",
        user_id=user_id,
        day=policy.utc_day(datetime.now(UTC)),
        images=images,
        by=by,
        note=note,
    )
    partition = quota_log.partition_of(user_id, await quota_log.partition_count(pool))
    async with quota_log.appending(pool, partition) as log:
        await log.append([quota_log.Entry(adjusted, {"policy_version": policy.POLICY_VERSION})])
    return adjusted
