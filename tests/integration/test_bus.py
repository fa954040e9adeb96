"""The bus on a real JetStream: one message that keeps failing fails alone, whether the
service handles messages one at a time or in batches."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import nats
import pytest
import pytest_asyncio
from opentelemetry import trace

from infra.nats_auth import ADMIN
from infra.platform import Platform
from shared import subjects
from shared.access import Access, Undeclared
from shared.bus import Bus
from shared.consuming import Received
from shared.events import PromptSubmitted, RequestFailed
from shared.subjects import Channel, Stream

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def bus_and_stream(platform: Platform) -> AsyncIterator[tuple[Bus, Stream]]:
    tag = uuid.uuid4().hex[:8]
    stream = Stream(f"KILN_TEST_BUS_{tag}", Channel(f"kiln.testbus{tag}.{{user}}", "a test's prompts"))
    access = Access(
        publish=frozenset({stream.channel.pattern, subjects.OUTCOME.pattern, subjects.dead_letter("testbus")}),
        streams=frozenset({stream.name, subjects.OUTCOMES.name}),
    )
    nc = await nats.connect(platform.nats_url, **platform.nats_options(ADMIN))
    js = nc.jetstream()
    await js.add_stream(name=stream.name, subjects=stream.subjects)
    bus = Bus(nc, "testbus", trace.get_tracer("tests"), access)
    try:
        yield bus, stream
    finally:
        await js.delete_stream(stream.name)
        await nc.close()


async def _send(bus: Bus, stream: Stream, user: str, requests: list[str]) -> None:
    for request in requests:
        await bus.publish(stream.channel.subject(user), PromptSubmitted(request_id=request, user_id=user, prompt="p"))


async def _run_until(condition, consuming: asyncio.Task, stop: asyncio.Event, timeout_s: float = 30) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await consuming


async def _gave_up(bus: Bus, user: str, request: str) -> RequestFailed | None:
    message = await bus.last_message(subjects.OUTCOMES, subjects.outcome(user, request))
    return None if message is None else message.event()


@pytest.mark.parametrize("batched", [False, True], ids=["one at a time", "batches"])
async def test_a_message_that_keeps_failing_fails_alone(bus_and_stream: tuple[Bus, Stream], batched: bool):
    bus, stream = bus_and_stream
    user = f"u{uuid.uuid4().hex[:10]}"
    good = [f"good{n}" for n in range(5)]
    handled: Counter[str] = Counter()

    def work(request: str) -> None:
        handled[request] += 1
        if request == "bad":
            raise RuntimeError("this one never works")

    async def one(event: PromptSubmitted) -> None:
        work(event.request_id)

    async def many(batch: list[Received]) -> None:
        for delivery in batch:
            work(delivery.event.request_id)

    await _send(bus, stream, user, [*good[:2], "bad", *good[2:]])  # the bad one in mid-batch
    stop = asyncio.Event()
    options = dict(accepts=(PromptSubmitted,), max_attempts=2, batch=16)
    consuming = asyncio.create_task(
        bus.consume(stream, "testbus", many, stop, batched=True, **options)
        if batched
        else bus.consume(stream, "testbus", one, stop, **options)
    )
    # Tries of the bad one before it is given up: 2 (in batches, its failed batch counts
    # as one more, as the batch is then handled one message at a time).
    tries = 3 if batched else 2
    await _run_until(lambda: handled["bad"] >= tries and all(handled[r] for r in good), consuming, stop)
    await asyncio.sleep(0.5)  # time for a wrong redelivery

    failed = await _gave_up(bus, user, "bad")
    assert (failed.reason, failed.stage) == ("gave_up", "testbus")
    for request in good:
        assert await _gave_up(bus, user, request) is None
    (info,) = [c for c in await bus.consumers(stream) if c.name == "testbus"]
    assert (info.num_pending, info.num_ack_pending) == (0, 0)  # every good message acked
    # One at a time, each good message is handled once; in batches, a failed batch is
    # handled again one by one, so its good messages may be handled twice, never more.
    assert all(handled[r] == 1 for r in good) if not batched else all(1 <= handled[r] <= 2 for r in good)


async def test_a_service_cannot_publish_or_read_what_it_did_not_declare(platform: Platform, user: str):
    """Quota's declaration, on the real bus: a render job (context's to publish) and the
    render queue (render's to read) are refused before anything reaches NATS."""
    from services.quota.__main__ import SERVICE as QUOTA

    nc = await nats.connect(platform.nats_url, **platform.nats_options("quota"))
    bus = Bus(nc, "quota", trace.get_tracer("tests"), QUOTA.access())
    job = subjects.render_job("free", user)
    try:
        with pytest.raises(Undeclared, match=job):
            await bus.publish(job, PromptSubmitted(request_id="r1", user_id=user, prompt="p"))
        with pytest.raises(Undeclared, match=subjects.RENDER_JOBS.name):
            await bus.last_message(subjects.RENDER_JOBS, job)
        with pytest.raises(Undeclared):
            await bus.listen(subjects.RENDER_PROGRESS.pattern, _ignore)
        # What it declared goes through.
        assert await bus.last_message(subjects.OUTCOMES, subjects.outcome(user, "r1")) is None
        admin = await platform.bus()
        assert not await admin.subject_counts(subjects.RENDER_JOBS, job)  # nothing was published
        await admin.close()
    finally:
        await nc.close()


async def _ignore(_message) -> None:
    pass
