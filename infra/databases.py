"""Scratch databases on a PostgreSQL server, for tests and benchmarks that must not touch
the database they were pointed at."""

from __future__ import annotations

import uuid

import asyncpg


async def create_database(server_url: str, prefix: str) -> tuple[str, str]:
    """A new, empty database on the server `server_url` points at: (its URL, its name)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}", name


async def drop_database(server_url: str, name: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
