"""The bus on a real JetStream: one message that keeps failing fails alone, whether the
service handles messages one at a time or in batches."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
import pytest_asyncio
from opentelemetry import trace

from infra.platform import Platform
from shared import subjects
from shared.bus import Bus, Delivery
from shared.events import PromptSubmitted, RequestFailed, decode, encode
from shared.subjects import Stream

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def bus_and_stream(platform: Platform) -> AsyncIterator[tuple[Bus, Stream]]:
    tag = uuid.uuid4().hex[:8]
    stream = Stream(f"KILN_TEST_BUS_{tag}", [f"kiln.testbus{tag}.*"], user_token=2)
    nc = await nats.connect(platform.nats_url)
    bus = Bus(nc, "testbus", trace.get_tracer("tests"))
    await bus.js.add_stream(name=stream.name, subjects=stream.subjects)
    try:
        yield bus, stream
    finally:
        await bus.js.delete_stream(stream.name)
        await nc.close()


async def _send(bus: Bus, stream: Stream, user: str, requests: list[str]) -> None:
    subject = stream.subjects[0].replace("*", user)
    for request in requests:
        await bus.js.publish(subject, encode(PromptSubmitted(request_id=request, user_id=user, prompt="p")))


async def _run_until(condition, consuming: asyncio.Task, stop: asyncio.Event, timeout_s: float = 30) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await consuming


async def _gave_up(bus: Bus, user: str, request: str) -> RequestFailed:
    message = await bus.js.get_last_msg(subjects.OUTCOMES.name, subjects.outcome(user, request))
    return decode(message.data)


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

    async def one(event: PromptSubmitted, _msg) -> None:
        work(event.request_id)

    async def many(batch: list[Delivery]) -> None:
        for delivery in batch:
            work(delivery.event.request_id)

    await _send(bus, stream, user, [*good[:2], "bad", *good[2:]])  # the bad one in mid-batch
    stop = asyncio.Event()
    options = dict(accepts=(PromptSubmitted,), max_attempts=2, batch=16)
    consuming = asyncio.create_task(
        bus.consume_batches(stream, "testbus", many, stop, **options)
        if batched else bus.consume(stream, "testbus", one, stop, **options)
    )
    # Tries of the bad one before it is given up: 2 (in batches, its failed batch counts
    # as one more, as the batch is then handled one message at a time).
    tries = 3 if batched else 2
    await _run_until(lambda: handled["bad"] >= tries and all(handled[r] for r in good), consuming, stop)
    await asyncio.sleep(0.5)  # time for a wrong redelivery

    failed = await _gave_up(bus, user, "bad")
    assert (failed.reason, failed.stage) == ("gave_up", "testbus")
    for request in good:
        with pytest.raises(nats.js.errors.NotFoundError):
            await _gave_up(bus, user, request)
    info = await bus.js.consumer_info(stream.name, "testbus")
    assert (info.num_pending, info.num_ack_pending) == (0, 0)  # every good message acked
    # One at a time, each good message is handled once; in batches, a failed batch is
    # handled again one by one, so its good messages may be handled twice, never more.
    assert all(handled[r] == 1 for r in good) if not batched else all(1 <= handled[r] <= 2 for r in good)
