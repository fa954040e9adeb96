"""Span kinds and error statuses, read from an in-memory exporter: the client's span is
CLIENT, a publish PRODUCER, the handling of a message CONSUMER (a child of its publish),
and a span whose work failed ends as an error. The bus runs on a stand-in NATS connection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nats.js.api import PubAck
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import kiln.cli
import kiln.client
from kiln.client import KilnClient
from shared import consuming, subjects
from shared.access import Access
from shared.bus import Bus
from shared.consuming import Received
from shared.events import ImageDelivered, PromptSubmitted, QuotaDenied, RequestFailed
from shared.telemetry import _AttributesForTracingUIs


class FakeJetStream:
    """Takes publishes as JetStream would, keeping their headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        self.headers.append(headers)
        return PubAck(stream=subjects.PROMPTS.name, seq=len(self.headers))


class FakeNats:
    def __init__(self) -> None:
        self.js = FakeJetStream()

    def jetstream(self) -> FakeJetStream:
        return self.js


class FakeMsg:
    """A message as a pull consumer hands it over."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.subject = subjects.prompt_submitted("alice")
        self.headers = headers
        self.metadata = SimpleNamespace(stream=subjects.PROMPTS.name, num_delivered=1)
        self.naks: list[float] = []

    async def nak(self, delay: float = 0) -> None:
        self.naks.append(delay)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> trace.Tracer:
    provider = TracerProvider()
    provider.add_span_processor(_AttributesForTracingUIs("test"))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test")


@pytest.fixture
def bus(tracer: trace.Tracer) -> Bus:
    access = Access(publish=frozenset({subjects.PROMPT_SUBMITTED.pattern}))
    return Bus(FakeNats(), "quota", tracer, access)  # type: ignore[arg-type]


def _prompt() -> PromptSubmitted:
    return PromptSubmitted(request_id="r1", user_id="alice", prompt="a red circle")


def _named(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


async def test_a_publish_is_a_producer_span_and_the_message_is_handled_in_a_consumer_span_under_it(
    bus: Bus, tracer: trace.Tracer, exporter: InMemorySpanExporter
):
    with tracer.start_as_current_span("kiln generate", kind=SpanKind.CLIENT):
        assert await bus.publish(subjects.prompt_submitted("alice"), _prompt())
    (headers,) = bus._js.headers
    bus.span(_prompt(), FakeMsg(headers)).end()  # type: ignore[arg-type]

    spans = _named(exporter)
    client, publish, handle = spans["kiln generate"], spans["publish PromptSubmitted"], spans["quota PromptSubmitted"]
    assert (client.kind, publish.kind, handle.kind) == (SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert publish.parent.span_id == client.context.span_id
    assert handle.parent.span_id == publish.context.span_id  # the traceparent was the publish's
    assert publish.attributes["messaging.destination.name"] == subjects.PROMPTS.name  # the stream, not the subject
    assert publish.attributes["kiln.published"] is True
    # Phoenix shows attributes, not OpenTelemetry's kind: the kind travels as one too.
    assert {name: span.attributes["kiln.span_kind"] for name, span in spans.items()} == {
        "kiln generate": "client",
        "publish PromptSubmitted": "producer",
        "quota PromptSubmitted": "consumer",
    }


async def test_a_publish_outside_any_trace_starts_none(bus: Bus, exporter: InMemorySpanExporter):
    assert await bus.publish(subjects.prompt_submitted("alice"), _prompt())
    assert exporter.get_finished_spans() == ()
    assert "traceparent" not in bus._js.headers[0]


async def test_a_handler_that_raises_ends_its_span_as_an_error(bus: Bus, exporter: InMemorySpanExporter):
    async def handler(items: list[Received]) -> None:
        raise ConnectionError("the database is down")

    msg = FakeMsg({})
    await consuming._handle(bus, [Received(_prompt(), msg)], handler, max_attempts=3)  # type: ignore[arg-type]

    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.CONSUMER
    assert (span.status.status_code, span.status.description) == (
        StatusCode.ERROR,
        "ConnectionError: the database is down",
    )
    assert [event.name for event in span.events] == ["exception"]
    assert msg.naks == [2.0]  # and it is retried later


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (
            RequestFailed(request_id="r1", user_id="alice", stage="render", reason="gave_up", detail="3 renders"),
            StatusCode.ERROR,
        ),
        (
            QuotaDenied(request_id="r1", user_id="alice", reason="daily_limit", plan="free", detail="3 a day"),
            StatusCode.UNSET,
        ),
    ],
)
async def test_the_sdks_request_span_is_a_client_span_that_fails_with_its_request(
    bus: Bus,
    tracer: trace.Tracer,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    outcome: RequestFailed | QuotaDenied | ImageDelivered,
    status: StatusCode,
):
    async def follow(*args: object) -> RequestFailed | QuotaDenied | ImageDelivered:
        return outcome

    monkeypatch.setattr(kiln.client, "tracer", tracer)
    client = KilnClient(bus)
    monkeypatch.setattr(client, "_follow", follow)
    assert await client.generate("a red circle", user_id="alice") is outcome

    (span,) = exporter.get_finished_spans()
    assert (span.name, span.kind, span.status.status_code) == ("kiln generate", SpanKind.CLIENT, status)


def test_the_clis_root_span_is_a_client_span(
    tracer: trace.Tracer, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(kiln.cli, "tracer", tracer)
    with kiln.cli._request_trace(SimpleNamespace(trace_link=lambda trace_id: None)):  # type: ignore[arg-type]
        pass
    (span,) = exporter.get_finished_spans()
    assert (span.name, span.kind, span.parent) == ("kiln cli", SpanKind.CLIENT, None)
