"""Least privilege in PostgreSQL: the quota service's role may read and append the log and
nothing more; the auditor's role may only read; the launcher hands each process only the
database access it needs."""

from __future__ import annotations

import asyncpg
import psutil
import pytest

from infra.platform import Platform
from shared.settings import AUDITOR_ROLE, QUOTA_ROLE, as_role

pytestmark = pytest.mark.integration

LOG_EDITS = (
    "UPDATE quota_events SET hash = hash",
    "DELETE FROM quota_events",
    "TRUNCATE quota_events",
    "ALTER TABLE quota_events DISABLE TRIGGER USER",
    "DROP TABLE quota_events",
)


async def _refused(conn: asyncpg.Connection, sql: str) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(sql)
    except asyncpg.InsufficientPrivilegeError:
        return True
    return False


async def test_quotas_role_reads_and_appends_the_log_but_cannot_edit_it(platform: Platform):
    assert platform.database_url
    conn = await asyncpg.connect(as_role(platform.database_url, QUOTA_ROLE))
    try:
        assert await conn.fetchval("SELECT count(*) FROM quota_events") >= 0
        for sql in LOG_EDITS:
            assert await _refused(conn, sql), f"{QUOTA_ROLE} may {sql}"
        assert await _refused(conn, "INSERT INTO accounts (user_id, plan) VALUES ('mallory', 'pro')")
    finally:
        await conn.close()


async def test_the_auditors_role_may_only_read(platform: Platform):
    assert platform.database_url
    conn = await asyncpg.connect(as_role(platform.database_url, AUDITOR_ROLE))
    try:
        assert await conn.fetchval("SELECT count(*) FROM quota_events") >= 0
        for sql in (
            *LOG_EDITS,
            "INSERT INTO quota_outbox (position) VALUES (-1)",
            "UPDATE quota_chain_head SET hash = hash",
        ):
            assert await _refused(conn, sql), f"{AUDITOR_ROLE} may {sql}"
    finally:
        await conn.close()


def test_only_quota_gets_the_database_and_only_as_its_role(platform: Platform):
    for name, process in platform.services.items():
        url = psutil.Process(process.pid).environ().get("KILN_DATABASE_URL", "")
        if name.startswith("quota"):
            assert url.startswith(f"postgresql://{QUOTA_ROLE}@"), url
        else:
            assert url == "", f"{name} was given {url}"
