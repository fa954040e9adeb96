"""Conversations, edits in words, styles, limits and the blocklist, on the real stack."""

from __future__ import annotations

import asyncio
import io
import uuid

import numpy as np
import pytest
from PIL import Image

from infra.platform import Platform
from kiln.client import KilnClient, ServiceUnavailable
from shared import subjects
from shared.events import ImageDelivered, PromptSubmitted, RequestFailed
from tests.conftest import replaced

pytestmark = pytest.mark.integration


def _conversation() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def _blueness(png: bytes) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    return float((pixels[..., 2] - pixels[..., 0]).mean())


async def test_a_conversation_edits_its_last_image_in_words_and_keeps_its_style(client: KilnClient, user: str):
    conversation = _conversation()
    first = await client.generate(
        "a red circle on a white background", user_id=user, conversation_id=conversation, style="watercolor", steps=20
    )
    assert isinstance(first, ImageDelivered), first
    assert first.prompt == "a red circle on a white background, watercolor painting, soft edges, paper texture"

    edited = await client.generate("make it blue", user_id=user, conversation_id=conversation, steps=20)
    assert isinstance(edited, ImageDelivered), edited
    # The instruction was applied to the earlier subject, the style kept, the image edited.
    assert edited.prompt == "a blue circle on a white background, watercolor painting, soft edges, paper texture"
    assert edited.composition.edit_of == first.request_id and edited.composition.text == "make it blue"
    assert _blueness(await client.download(edited)) > _blueness(await client.download(first)) + 5

    plain = await client.generate("a green square", user_id=user, conversation_id=conversation, style="none")
    assert isinstance(plain, ImageDelivered), plain
    assert plain.prompt == "a green square" and plain.composition.edit_of is None

    turns = await client.conversation(user, conversation)
    assert [t.request_id for t in turns] == [first.request_id, edited.request_id, plain.request_id]
    assert [t.composition.style for t in turns] == ["watercolor", "watercolor", ""]


async def test_an_edit_by_id_joins_the_subject_of_that_image(client: KilnClient, user: str):
    original = await client.generate("a yellow triangle at the left", user_id=user, steps=20)
    assert isinstance(original, ImageDelivered), original
    edited = await client.generate("make it red", user_id=user, edit_of=original.request_id, steps=20)
    assert isinstance(edited, ImageDelivered), edited
    assert edited.prompt == "a red triangle at the left"


async def test_nothing_to_edit_blocked_words_and_unknown_styles_fail_with_a_reason_and_are_refunded(
    client: KilnClient, user: str
):
    cases = [
        (dict(prompt="make it blue", edit_of="last", conversation_id=_conversation()), "nothing_to_edit"),
        (dict(prompt="a GORE scene"), "blocked"),
        (dict(prompt="a red circle", style="cubism"), "unknown_style"),
    ]
    for fields, reason in cases:
        outcome = await client.generate(user_id=user, **fields)
        assert isinstance(outcome, RequestFailed), outcome
        assert (outcome.stage, outcome.reason) == ("context", reason) and outcome.detail
    # Three refusals, three refunds: the whole allowance is still there.
    for _ in range(100):
        if (status := await client.quota(user)).used == 0:
            break
        await asyncio.sleep(0.1)
    assert (status.used, status.limit, status.left, status.plan) == (0, 3, 3, "free")


async def test_an_edit_in_words_while_the_last_image_is_still_drawing_is_refused(client: KilnClient, user: str):
    conversation = _conversation()
    first = PromptSubmitted(
        request_id=uuid.uuid4().hex,
        user_id=user,
        conversation_id=conversation,
        prompt="a red circle",
        steps=50,
    )
    await client.submit(first)  # not waited for: it is still drawing when the edit comes
    edit = await client.generate("make it blue", user_id=user, conversation_id=conversation)
    assert isinstance(edit, RequestFailed) and (edit.stage, edit.reason) == ("context", "still_drawing"), edit
    assert isinstance(await client.wait_for_outcome(user, first.request_id), ImageDelivered)


async def test_quota_status_counts_todays_images(client: KilnClient, user: str):
    assert (await client.quota(user)).left == 3
    outcome = await client.generate("a red circle", user_id=user)
    assert isinstance(outcome, ImageDelivered), outcome
    status = await client.quota(user)
    assert (status.used, status.left) == (1, 2)
    with pytest.raises(ServiceUnavailable, match="quota: not a user id"):
        await client.quota("a%b")


async def test_context_offers_its_styles(client: KilnClient):
    styles = await client.styles()
    assert styles["watercolor"] == "Watercolor" and "pixel-art" in styles


async def test_two_context_processes_record_turns_sent_at_once_each_once(
    platform: Platform, client: KilnClient, user: str
):
    conversation = _conversation()
    # Each appends only after the turn it read last; the loser of a race reads again.
    with replaced(platform, "context", ("context-a", {}), ("context-b", {})):
        while (await client.js.consumer_info(subjects.QUOTA.name, "context")).num_waiting < 2:
            await asyncio.sleep(0.1)  # both are pulling
        outcomes = await asyncio.gather(
            *(
                client.generate(f"a {colour} circle", user_id=user, conversation_id=conversation)
                for colour in ("red", "green", "blue")
            )
        )
        turns = await client.conversation(user, conversation)  # context answers: asked while it runs
    assert all(isinstance(o, ImageDelivered) for o in outcomes), outcomes
    assert sorted(t.request_id for t in turns) == sorted(o.request_id for o in outcomes)
