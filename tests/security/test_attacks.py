"""Who may do what on the bus, tried the way an attacker would: a plain nats-py client with
a user's own credential (what `kiln accounts add-user` gives), against the real platform
with authentication on. Each attack of issue #8 is refused by the NATS server itself (a
permissions violation), not by Kiln's own code; and the same credential still does
everything a user should be able to do.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.aio.client
import nats.errors
import pytest
import pytest_asyncio

from infra.nats_auth import Authority, user_permissions
from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.access import credential_options
from shared.events import (
    ImageDelivered,
    PromptSubmitted,
    QuotaGranted,
    RenderRequested,
    RequestFailed,
    WorkerHeartbeat,
    encode,
)
from shared.settings import Settings

pytestmark = [
    pytest.mark.integration,
    # Against a server Kiln does not configure (KILN_NATS_URL with KILN_NATS_AUTH=off)
    # there is no authentication to test: everything below would be allowed.
    pytest.mark.skipif(not Settings.from_env().nats_auth, reason="KILN_NATS_AUTH=off"),
]


@dataclass
class Intruder:
    """A user's connection and every permissions violation the server reported to it."""

    name: str
    credentials: Path
    nc: nats.aio.client.Client
    violations: list[str] = field(default_factory=list)

    async def refused(self, attempt: Callable[[], Awaitable[object]], what: str) -> None:
        """`attempt` must end in a permissions violation for `what` (and do nothing)."""
        before = len(self.violations)
        try:
            await attempt()
        except (TimeoutError, nats.errors.Error):
            pass  # a denied request is never answered
        await self.nc.flush()
        for _ in range(20):
            if any(what.lower() in v.lower() for v in self.violations[before:]):  # nats-py lowercases it
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no permissions violation for {what}; the server said {self.violations[before:]}")

    async def publish(self, subject: str, data: bytes = b"") -> None:
        await self.refused(lambda: self.nc.publish(subject, data), f'publish to "{subject}"')

    async def request(self, subject: str) -> None:
        await self.refused(lambda: self.nc.request(subject, b"{}", timeout=0.5), f'publish to "{subject}"')

    async def subscribe(self, subject: str) -> None:
        await self.refused(lambda: self.nc.subscribe(subject), f'subscription to "{subject}"')


async def _connect_as(platform: Platform, name: str, folder: Path) -> Intruder:
    credentials = Authority.open(platform.data_dir).write_credentials(
        folder / f"{name}.creds", name, user_permissions(name)
    )
    intruder = Intruder(name, credentials, None)  # type: ignore[arg-type]

    async def on_error(error: Exception) -> None:
        intruder.violations.append(str(error))

    intruder.nc = await nats.connect(platform.nats_url, **credential_options(credentials, name), error_cb=on_error)
    return intruder


@pytest_asyncio.fixture
async def mallory(platform: Platform, tmp_path: Path) -> AsyncIterator[Intruder]:
    intruder = await _connect_as(platform, f"mallory{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        yield intruder
    finally:
        await intruder.nc.close()


@pytest_asyncio.fixture
async def victim_image(client: KilnClient, user: str) -> ImageDelivered:
    delivered = await client.generate("a green circle", user_id=user)
    assert isinstance(delivered, ImageDelivered)
    return delivered


async def test_without_a_credential_nobody_gets_in(platform: Platform):
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(platform.nats_url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_a_user_credential_does_what_a_user_should(platform: Platform, mallory: Intruder):
    """The positive control: the SDK with the user's own credential submits, hears its
    progress and outcome, reads its stored outcome, its decision's trace and its quota."""
    async with await KilnClient.connect(platform.nats_url, mallory.credentials, mallory.name) as own:
        delivered = await own.generate("a red circle", user_id=mallory.name)
        assert isinstance(delivered, ImageDelivered)
        assert await own.recorded_outcome(mallory.name, delivered.request_id) == delivered
        assert await own.trace_id(mallory.name, delivered.request_id)
        assert (await own.quota(mallory.name)).used == 1
        assert await own.styles()
        assert (await own.link(mallory.name, delivered.request_id)).url
    assert mallory.violations == []


async def test_a_user_cannot_skip_quota_or_refund_itself(mallory: Intruder):
    """(a) a render job or a grant of its own making; (b) a failure for its own request."""
    job = RenderRequested(
        request_id="r1", user_id=mallory.name, prompt="free image", width=32, height=32, steps=10, seed=1,
        tier="paid", plan="pro",
    )  # fmt: skip
    await mallory.publish(subjects.render_job("paid", mallory.name), encode(job))
    grant = QuotaGranted(
        request_id="r1", user_id=mallory.name, plan="pro", tier="paid", used=1, limit=2000, day="2026-12-02",
        submission=PromptSubmitted(request_id="r1", user_id=mallory.name, prompt="p"),
    )  # fmt: skip
    await mallory.publish(subjects.quota_decided(mallory.name, "r1"), encode(grant))
    refund = RequestFailed(request_id="r1", user_id=mallory.name, stage="render", reason="gave_up", detail="")
    await mallory.publish(subjects.outcome(mallory.name, "r1"), encode(refund))


async def test_a_user_cannot_act_for_another(mallory: Intruder, user: str, victim_image: ImageDelivered):
    """(c) a prompt in another's name; (f) a cancel of another's request; (h) an outcome
    for another's request, sent first."""
    prompt = PromptSubmitted(request_id="r2", user_id=user, prompt="on your quota")
    await mallory.publish(subjects.prompt_submitted(user), encode(prompt))
    await mallory.publish(subjects.render_cancel(user, victim_image.request_id))
    forged = RequestFailed(request_id="r3", user_id=user, stage="render", reason="gave_up", detail="")
    await mallory.publish(subjects.outcome(user, "r3"), encode(forged))


async def test_a_user_cannot_read_what_is_not_its_own(mallory: Intruder, user: str, victim_image: ImageDelivered):
    """(d) another's outcomes, decisions, progress, conversations and images (a link to one
    too); any other inbox."""
    await mallory.subscribe(subjects.OUTCOME.subject(user, "*"))
    await mallory.subscribe(subjects.RENDER_PROGRESS.subject(user, "*"))
    await mallory.subscribe("_INBOX.>")
    await mallory.subscribe(">")
    outcome = subjects.outcome(user, victim_image.request_id)
    await mallory.request(f"$JS.API.DIRECT.GET.{subjects.OUTCOMES.name}.{outcome}")
    decision = subjects.quota_decided(user, victim_image.request_id)
    await mallory.request(f"$JS.API.DIRECT.GET.{subjects.QUOTA.name}.{decision}")
    await mallory.request(f"$JS.API.STREAM.MSG.GET.{subjects.OUTCOMES.name}")
    await mallory.request(f"$JS.API.CONSUMER.CREATE.{subjects.CONVERSATIONS.name}")
    await mallory.request(f"$JS.API.STREAM.INFO.OBJ_{subjects.IMAGES.name}")
    await mallory.request(subjects.CONTEXT_TURNS.subject(user, "c1"))
    await mallory.request(subjects.quota_status(user))
    await mallory.request(subjects.delivery_link(user, victim_image.request_id))


async def test_a_user_cannot_change_streams_consumers_or_images(
    platform: Platform, mallory: Intruder, user: str, victim_image: ImageDelivered
):
    """(e) streams and consumers; (g) another's stored image."""
    await mallory.request(f"$JS.API.STREAM.DELETE.{subjects.OUTCOMES.name}")
    await mallory.request("$JS.API.STREAM.CREATE.MINE")
    await mallory.request(f"$JS.API.CONSUMER.DELETE.{subjects.PROMPTS.name}.{subjects.DURABLE_QUOTA_PROMPTS}")
    key = subjects.image_key(user, victim_image.request_id)
    await mallory.publish(f"$O.{subjects.IMAGES.name}.C.forged", b"\x89PNG not yours")
    await mallory.publish(f"$O.{subjects.IMAGES.name}.M.{key}", b"{}")
    admin = await platform.bus()
    try:  # all still there
        assert await admin.last_message(subjects.OUTCOMES, subjects.outcome(user, victim_image.request_id))
        assert subjects.DURABLE_QUOTA_PROMPTS in {c.name for c in await admin.consumers(subjects.PROMPTS)}
    finally:
        await admin.close()


async def test_a_user_cannot_fake_fleet_pressure(client: KilnClient, mallory: Intruder):
    """(i) heartbeats of a pretend worker with a deep queue."""
    beat = WorkerHeartbeat(worker_id="fake", device="cpu", model="x", queue_depth=10_000, cpu_load=0.1)
    await mallory.publish(subjects.fleet_telemetry("fake"), encode(beat))
    await asyncio.sleep(0.5)
    assert (await client.pressure())["level"] == "normal"


async def test_a_service_credential_allows_only_its_declaration(platform: Platform, tmp_path: Path):
    """A compromised quota process still cannot queue render jobs or touch the images."""
    violations: list[str] = []

    async def on_error(error: Exception) -> None:
        violations.append(str(error))

    nc = await nats.connect(platform.nats_url, **platform.nats_options("quota"), error_cb=on_error)
    try:
        await nc.publish(subjects.render_job("paid", "x"), b"{}")
        await nc.publish(f"$O.{subjects.IMAGES.name}.C.x", b"")
        await nc.flush()
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    assert any("kiln.render.jobs.paid.x" in v.lower() for v in violations), violations
    assert any(f"$o.{subjects.IMAGES.name}.c.x" in v.lower() for v in violations), violations


async def test_add_user_then_login_gives_the_cli_that_user_only(platform: Platform, tmp_path: Path):
    name = f"carol{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HOME": str(tmp_path), "KILN_DATA_DIR": str(platform.data_dir)}
    env |= {"KILN_NATS_URL": platform.nats_url or "", "KILN_DATABASE_URL": platform.database_url or ""}

    async def kiln(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kiln.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await process.communicate()
        return process.returncode or 0, out.decode()

    code, said = await kiln("accounts", "add-user", name, "-o", str(tmp_path / "carol.creds"))
    assert code == 0, said
    code, said = await kiln("login", str(tmp_path / "carol.creds"))
    assert code == 0 and f"logged in as {name}" in said, said
    assert oct((tmp_path / ".config" / "kiln" / "credentials.creds").stat().st_mode & 0o777) == "0o600"
    code, said = await kiln("generate", "a red circle", "--user", name, "-o", str(tmp_path / "out.png"))
    assert code == 0, said
    code, said = await kiln("generate", "a red circle", "--user", "someone-else")
    assert code == 64 and f"is {name}'s, not someone-else's" in said, said
