"""A rolling update under load: `Platform.roll` (what `kiln fleet restart render` asks `kiln
up` to do, and what a Deployment with maxUnavailable 1 does) replaces the render workers one
at a time while requests keep coming: none is lost, none fails, each is delivered once."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.events import ImageDelivered

pytestmark = pytest.mark.integration

EXTRA_WORKERS = ("render-roll-2", "render-roll-3")
CONCURRENT = 4


async def test_a_rolling_restart_of_render_under_load_loses_and_fails_nothing(platform: Platform, client: KilnClient):
    for name in EXTRA_WORKERS:
        platform.start_service("render", instance=name)
    outcomes: dict[tuple[str, str], object] = {}
    rolling = True

    async def load() -> None:
        """A closed loop of CONCURRENT users, each with a request in flight, until the roll
        has ended (and at least a few requests were made)."""

        async def one() -> None:
            user, request = f"roll{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            outcomes[(user, request)] = None  # sent
            outcomes[(user, request)] = await client.generate(
                "a red circle", user_id=user, request_id=request, steps=4, timeout_s=180
            )

        while rolling or len(outcomes) < 8:
            await asyncio.gather(*(one() for _ in range(CONCURRENT)))

    try:
        sending = asyncio.ensure_future(load())
        await asyncio.sleep(2)
        started = time.monotonic()
        exits = await platform.roll("render", grace_s=60)
        rolled_s = time.monotonic() - started
        rolling = False
        await asyncio.wait_for(sending, 240)
    finally:
        for name in EXTRA_WORKERS:
            platform.stop_service(name)

    assert [name for name, _ in exits] == ["render", *EXTRA_WORKERS]
    assert all(code == 0 for _, code in exits), exits  # each drained and exited on SIGTERM
    assert platform.services["render"].poll() is None  # the usual worker is back
    not_delivered = {key: o for key, o in outcomes.items() if not isinstance(o, ImageDelivered)}
    assert not not_delivered, not_delivered
    for user, request in outcomes:  # exactly one outcome each
        info = await client.js.stream_info(subjects.OUTCOMES.name, subjects_filter=subjects.outcome(user, request))
        assert (info.state.subjects or {}).get(subjects.outcome(user, request)) == 1
    print(f"rolled 3 workers in {rolled_s:.1f} s; {len(outcomes)} requests, all delivered")
