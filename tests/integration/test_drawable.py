"""Honest results on the real stack: what the bundled model cannot draw is refused by
context, naming the words it did not understand, and refunded; nothing else is drawn in
its place."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kiln.client import KilnClient
from shared.events import ImageDelivered, QuotaStatus, RequestFailed

pytestmark = pytest.mark.integration


async def _refunded(client: KilnClient, user: str, used: int) -> QuotaStatus:
    """The user's quota once refunds have brought it down to `used` (or after 10 s)."""
    for _ in range(100):
        if (status := await client.quota(user)).used == used:
            break
        await asyncio.sleep(0.1)
    return status


async def test_a_prompt_naming_nothing_the_model_draws_is_refused_naming_the_words_and_refunded(
    client: KilnClient, user: str
):
    outcome = await client.generate("a cat riding a bicycle", user_id=user)
    assert isinstance(outcome, RequestFailed), outcome
    assert (outcome.stage, outcome.reason) == ("context", "not_drawable")
    assert '"cat", "riding", "bicycle"' in outcome.detail and "circle, square, triangle" in outcome.detail
    status = await _refunded(client, user, used=0)
    assert (status.used, status.left) == (0, 3)


async def test_an_edit_the_model_cannot_draw_is_refused_not_echoed(client: KilnClient, user: str):
    conversation = f"c-{uuid.uuid4().hex[:12]}"
    first = await client.generate("a red circle", user_id=user, conversation_id=conversation)
    assert isinstance(first, ImageDelivered), first

    bordered = await client.generate("add a border", user_id=user, conversation_id=conversation)
    assert isinstance(bordered, RequestFailed), bordered  # before: "a red circle, with a border", unchanged
    assert (bordered.stage, bordered.reason) == ("context", "cannot_edit") and '"border"' in bordered.detail
    status = await _refunded(client, user, used=1)
    assert (status.used, status.left) == (1, 2)

    # An edit it can draw still is, from the same image.
    greened = await client.generate("on a green background", user_id=user, conversation_id=conversation)
    assert isinstance(greened, ImageDelivered), greened
    assert greened.prompt == "a red circle on a green background" and greened.composition.edit_of == first.request_id
