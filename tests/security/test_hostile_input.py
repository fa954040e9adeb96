"""Hostile input never stops a service: malformed, oversized, deeply nested and wrong-typed
messages on every subject of the bus, sent with a plain NATS client (what any client that
reaches NATS can do until the bus has per-user credentials, #8).

Hypothesis makes the messages; all of them are sent, then the test checks that no service
process died and that a normal request is still delivered. (The property is checked once,
after the whole corpus, so a failure is not shrunk to one message: the services' logs and
the dead letters name it.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import msgspec
import nats
import nats.js.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.bus import ORIGINAL_SUBJECT_HEADER, REASON_HEADER, SUBJECT_TAKEN, TRUNCATED_HEADER
from shared.events import MSGPACK, ImageDelivered, RequestFailed, encode

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

CASES = 400
EVENT_TYPES = [
    "PromptSubmitted", "QuotaGranted", "QuotaDenied", "RenderRequested", "RenderProgress", "RenderCompleted",
    "RenderFailed", "ImageDelivered", "RequestFailed", "TurnComposed", "WorkerHeartbeat", "NoSuchEvent",
]  # fmt: skip
FIELDS = [
    "request_id", "user_id", "conversation_id", "prompt", "width", "height", "steps", "seed", "strength",
    "guidance", "edit_of", "mask_key", "submission", "composition", "source_key", "worker_id", "queue_depth",
    "requested_at", "submitted_at", "plan", "tier", "reason", "url", "v",
]  # fmt: skip

# Subject tokens: valid ids, and what cannot name a consumer or a key (no dots, spaces or
# wildcards: NATS itself refuses those subjects).
tokens = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
    st.sampled_from(["a/b", "x" * 300, "é", "%00", "..", "paid", "free", "evil"]).filter(lambda t: "." not in t),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
event_like = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(EVENT_TYPES),
    st.dictionaries(st.sampled_from(FIELDS), json_values | st.sampled_from(["\x00", "a" * 5000, -0.0]), max_size=8),
)


def _deep(depth: int) -> bytes:
    return (
        b'{"type":"PromptSubmitted","request_id":"r","user_id":"u","prompt":"p","x":'
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


payloads = st.one_of(
    st.binary(max_size=300).map(lambda data: (data, None)),
    event_like.map(lambda event: (json.dumps(event).encode(), None)),
    event_like.map(lambda event: (msgspec.msgpack.encode(event), MSGPACK)),
    st.builds(lambda d: (_deep(d), None), st.integers(1_000, 30_000)),
    st.sampled_from([float("nan"), float("inf"), -0.0]).map(
        lambda x: (msgspec.msgpack.encode({"type": "PromptSubmitted", "request_id": "r", "user_id": "u", "prompt": "p", "strength": x}), MSGPACK)
    ),
    st.sampled_from([b"\xff\xfe\xfd", b'{"prompt": "\xc3\x28"}', b"null", b"[]", b'"text"', b"1e999"]).map(
        lambda data: (data, None)
    ),
)  # fmt: skip
messages = st.tuples(st.sampled_from(subjects.ALL_CHANNELS), st.lists(tokens, min_size=4, max_size=4), payloads)


def _corpus() -> list[tuple[str, bytes, str | None]]:
    corpus: list[tuple[str, bytes, str | None]] = []

    @settings(max_examples=CASES, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages)
    def collect(message: tuple) -> None:
        channel, values, (data, content_type) = message
        corpus.append((channel.subject(*values[: len(channel.tokens)]), data, content_type))

    collect()
    return corpus


async def test_hostile_messages_on_every_subject_stop_no_service(platform: Platform, client: KilnClient):
    alive = {name: process.pid for name, process in platform.services.items() if process.poll() is None}
    assert set(alive) == {"quota", "context", "render", "delivery"}
    corpus = _corpus()
    # A compromised service's credential (or no auth at all): the admin's may send anything.
    attacker = await nats.connect(platform.nats_url, **platform.nats_options(ADMIN))
    js = attacker.jetstream()
    try:
        # A prompt just under the server's size limit: too large to be an event, and too
        # large to dead-letter with its headers unless cut.
        near_limit = subjects.prompt_submitted(f"u{uuid.uuid4().hex[:10]}")
        await js.publish(near_limit, b"x" * (attacker.max_payload - 200))
        dead = await _dead_letter_from(js, near_limit)
        assert "more than the" in dead.headers[REASON_HEADER]
        assert int(dead.headers[TRUNCATED_HEADER]) == attacker.max_payload - 200

        for subject, data, content_type in corpus:
            await attacker.publish(subject, data, headers={"Content-Type": content_type} if content_type else None)
        await attacker.flush()
        await asyncio.sleep(5)  # the services work through it
    finally:
        await attacker.close()

    for name, pid in alive.items():
        process = platform.services[name]
        assert process.pid == pid and process.poll() is None, f"{name} died (see {platform.log_dir}/{name}.log)"
    # A normal request still goes all the way: quota, context, the render queue, delivery.
    user = f"u{uuid.uuid4().hex[:10]}"
    assert isinstance(await client.generate("a red circle", user_id=user, timeout_s=120), ImageDelivered)
    log.info("sent %d hostile messages", len(corpus) + 1)


async def _dead_letter_from(js: nats.js.JetStreamContext, subject: str, timeout_s: float = 30):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await js.get_last_msg(subjects.DEAD_LETTERS.name, subjects.dead_letter("quota"))
        except nats.js.errors.NotFoundError:
            last = None
        if last is not None and (last.headers or {}).get(ORIGINAL_SUBJECT_HEADER) == subject:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"nothing from {subject} reached quota's dead letters in {timeout_s:.0f}s")


async def test_a_second_outcome_is_refused_by_the_server_whoever_sends_it(
    platform: Platform, client: KilnClient, user: str
):
    """A forger publishing a failure after the image was delivered, with a plain client
    and none of Kiln's headers: the stream keeps one message per request subject."""
    delivered = await client.generate("a blue square", user_id=user)
    assert isinstance(delivered, ImageDelivered)
    forged = RequestFailed(
        request_id=delivered.request_id, user_id=user, stage="render", reason="gave_up", detail="forged"
    )
    attacker = await nats.connect(platform.nats_url, **platform.nats_options(ADMIN))
    try:
        for subject in (
            subjects.outcome(user, delivered.request_id),
            subjects.render_event(user, delivered.request_id),
            subjects.quota_decided(user, delivered.request_id),
        ):
            with pytest.raises(nats.js.errors.APIError) as refused:
                await attacker.jetstream().publish(subject, encode(forged))
            assert refused.value.err_code == SUBJECT_TAKEN, subject
    finally:
        await attacker.close()
    assert await client.recorded_outcome(user, delivered.request_id) == delivered
