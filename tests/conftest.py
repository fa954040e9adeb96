"""The real stack for integration tests: NATS JetStream, PostgreSQL and the four services
as separate processes, started exactly as `kiln up` starts them.

By default the servers are the embedded ones (PyPI wheels) in a temporary folder on free
ports. With KILN_NATS_URL / KILN_DATABASE_URL set, the tests use those servers instead,
in a fresh database of their own; every test uses fresh users and request ids, so earlier
runs on the same NATS do not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import nats
import nats.aio.client
import nats.js
import pytest
import pytest_asyncio

from infra.databases import create_database, drop_database
from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import KilnClient
from services.quota.migrate import upgrade
from shared.bus import nats_servers
from shared.settings import DEFAULT_MODEL, Settings

TEST_PLANS = Path(__file__).parent / "integration" / "plans.toml"


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return DEFAULT_MODEL


@pytest_asyncio.fixture(scope="session")
async def platform(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> AsyncIterator[Platform]:
    settings = Settings.from_env()
    # The services (children) read the test plans: small paid limits, pressure only when a
    # test injects it.
    os.environ["KILN_PLANS"] = str(TEST_PLANS)
    # Some render tests need a render long enough to stop in the middle (hundreds of steps).
    os.environ["KILN_RENDER_MAX_STEPS"] = "500"
    stack = Platform.isolated(tmp_path_factory.mktemp("kiln"), model_path, settings)
    try:
        async with stack.running("kiln_test"):
            yield stack
    except BaseException:
        _print_service_logs(stack)  # (the logs outlive the stopped platform)
        raise


def _print_service_logs(stack: Platform) -> None:
    for log in sorted(stack.log_dir.glob("*.log")):
        print(f"----- {log.name} (last 40 lines)")
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


@contextlib.contextmanager
def replaced(platform: Platform, service: str, *instances: tuple[str, dict[str, str]]):
    """Run `service` as the given instances (name, extra env) instead of its usual process."""
    platform.stop_service(service)
    try:
        for name, env in instances:
            platform.start_service(service, instance=name, env=env)
        yield
    finally:
        for name, _ in instances:
            platform.stop_service(name)
        platform.start_service(service)


class TestClient(KilnClient):
    """The SDK's client, plus a raw NATS connection (`nc`, `js`) on which a test plays the
    other parts: a service publishing a job or a heartbeat, an attacker sending junk, an
    auditor reading a stream. The client itself is held to `CLIENT_ACCESS`."""

    nc: nats.aio.client.Client
    js: nats.js.JetStreamContext


@pytest_asyncio.fixture
async def client(platform: Platform) -> AsyncIterator[TestClient]:
    assert platform.nats_url
    # The admin's credential: the tests act for many users, as the playground's server does.
    async with await TestClient.connect(platform.nats_url, platform.credentials(ADMIN), ADMIN) as kiln:
        kiln.nc = await nats.connect(nats_servers(platform.nats_url), **platform.nats_options(ADMIN))
        kiln.js = kiln.nc.jetstream()
        try:
            yield kiln
        finally:
            await kiln.nc.close()


@pytest_asyncio.fixture
async def db(platform: Platform) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(platform.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def user() -> str:
    """A user no other test (or earlier run) has used: a full daily allowance."""
    return f"u{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def scratch_database(platform: Platform) -> AsyncIterator[str]:
    """A database of its own on the platform's server, migrated: for tests that tamper
    with the log or write it directly, away from the services' database."""
    url, name = await create_database(platform.database_url, "kiln_test")
    try:
        await asyncio.to_thread(upgrade, url)
        yield url
    finally:
        await drop_database(platform.database_url, name)
