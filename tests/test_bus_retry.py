"""The bus retries a JetStream publish that meets no stream (a leader being elected, a
server restarting), always idempotently: a publish whose ack was lost is retried only if it
carries a Nats-Msg-Id."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
from opentelemetry import trace

from shared import bus as bus_module
from shared.access import Access
from shared.bus import Bus


class FakeJetStream:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.sent: list[dict] = []

    async def publish(self, subject: str, data: bytes, headers: dict) -> str:
        self.sent.append(dict(headers))
        if self.failures:
            raise self.failures.pop(0)
        return "acked"


class FakeNats:
    def __init__(self, js: FakeJetStream) -> None:
        self.js = js

    def jetstream(self) -> FakeJetStream:
        return self.js


def bus_over(failures: list[Exception]) -> tuple[Bus, FakeJetStream]:
    js = FakeJetStream(failures)
    return Bus(FakeNats(js), "test", trace.get_tracer("test"), Access(publish=frozenset({">"}))), js


async def test_a_publish_that_meets_no_stream_is_retried_until_one_answers():
    bus, js = bus_over([nats.errors.NoRespondersError(), nats.errors.NoRespondersError()])
    assert await bus._publish_retrying("kiln.x", b"", {}) == "acked"
    assert len(js.sent) == 3


async def test_a_publish_that_meets_no_stream_is_retried_as_nats_py_reports_it():
    # js.publish turns a request's NoRespondersError into NoStreamResponseError.
    bus, js = bus_over([nats.js.errors.NoStreamResponseError()])
    assert await bus._publish_retrying("kiln.x", b"", {}) == "acked"
    assert len(js.sent) == 2


async def test_a_lost_ack_is_retried_with_the_same_message_id_and_never_without_one():
    bus, js = bus_over([nats.errors.TimeoutError()])
    assert await bus._publish_retrying("kiln.x", b"", {"Nats-Msg-Id": "u:r:prompt"}) == "acked"
    assert [h["Nats-Msg-Id"] for h in js.sent] == ["u:r:prompt", "u:r:prompt"]  # the server drops a twin

    bus, js = bus_over([nats.errors.TimeoutError()])
    with pytest.raises(nats.errors.TimeoutError):  # it may have been stored: a retry could duplicate it
        await bus._publish_retrying("kiln.x", b"", {})
    assert len(js.sent) == 1


async def test_the_retries_end_after_the_retry_window(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(bus_module, "PUBLISH_RETRY_S", 0.3)
    bus, js = bus_over([nats.errors.NoRespondersError() for _ in range(100)])
    with pytest.raises(nats.errors.NoRespondersError):
        await bus._publish_retrying("kiln.x", b"", {})
    assert 2 <= len(js.sent) < 10
