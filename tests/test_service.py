"""A service's declaration: what its consumers accept comes from its handlers' annotations,
and a declaration that is not whole is caught before anything runs."""

from __future__ import annotations

import pytest

from services.context.__main__ import SERVICE as CONTEXT
from services.delivery.__main__ import SERVICE as DELIVERY
from services.quota.__main__ import SERVICE as QUOTA
from services.render.__main__ import SERVICE as RENDER
from shared import subjects
from shared.consuming import Received
from shared.events import (
    ImageDelivered,
    PromptSubmitted,
    QuotaDenied,
    QuotaGranted,
    RenderCompleted,
    RenderFailed,
    RequestFailed,
)
from shared.service import Consume


def test_consumers_accept_the_event_types_their_handlers_are_annotated_with():
    prompts, refunds = QUOTA.consumes
    assert (prompts.accepts, prompts.batched) == ((PromptSubmitted,), True)
    assert set(refunds.accepts) == {QuotaDenied, ImageDelivered, RequestFailed} and not refunds.batched
    (decisions,) = CONTEXT.consumes
    assert set(decisions.accepts) == {QuotaGranted, QuotaDenied}
    (results,) = DELIVERY.consumes
    assert set(results.accepts) == {RenderCompleted, RenderFailed}


def test_every_consumed_event_can_arrive_on_its_stream():
    for service in (QUOTA, CONTEXT, DELIVERY, RENDER):
        for consume in service.consumes:
            carried = set(consume.stream.channel.events)
            assert set(consume.accepts) <= carried, (service.name, consume.durable)


def test_a_handler_without_event_annotations_is_refused():
    class App:
        async def untyped(self, event: dict) -> None: ...

        async def batched(self, batch: list[Received[PromptSubmitted]]) -> None: ...

    with pytest.raises(TypeError, match="event types"):
        _ = Consume(subjects.PROMPTS, "x", App.untyped).accepts
    assert Consume(subjects.PROMPTS, "x", App.batched).accepts == (PromptSubmitted,)


def test_durable_names_are_unique_per_stream():
    durables = [(c.stream.name, c.durable) for s in (QUOTA, CONTEXT, DELIVERY, RENDER) for c in s.consumes]
    assert len(durables) == len(set(durables))
