"""Reading what the streams keep: a request's outcome and a conversation's turns.

Context reads them to compose a turn; the SDK (and through it the CLI and the playground)
reads them to show a request's result and a conversation's history.
"""

from __future__ import annotations

import contextlib
import uuid

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import subjects
from shared.events import TERMINAL, ImageDelivered, QuotaDenied, RequestFailed, TurnComposed, decode

Outcome = ImageDelivered | QuotaDenied | RequestFailed


async def read_outcome(js: JetStreamContext, user_id: str, request_id: str) -> Outcome | None:
    """The request's outcome if JetStream holds one."""
    try:
        raw = await js.get_last_msg(subjects.OUTCOMES.name, subjects.outcome(user_id, request_id))
    except nats.js.errors.NotFoundError:
        return None
    try:
        event = decode(raw.data or b"", (raw.headers or {}).get("Content-Type"))
    except msgspec.DecodeError:
        return None  # someone else's garbage on our subject: not an outcome
    return event if isinstance(event, TERMINAL) else None


async def read_turns(js: JetStreamContext, user_id: str, conversation_id: str) -> tuple[list[TurnComposed], int]:
    """The conversation's turns in order, and the stream sequence of its last message (0 if
    none): the sequence a new turn must follow.

    One lookup for the last sequence, then a short-lived consumer that hands over the whole
    subject in one fetch (measured: 23 ms for 500 turns, against 185 ms reading them one
    request each; `make bench`)."""
    subject = subjects.conversation(user_id, conversation_id)
    try:
        last = (await js.get_last_msg(subjects.CONVERSATIONS.name, subject)).seq
    except nats.js.errors.NotFoundError:
        return [], 0
    stream, name = subjects.CONVERSATIONS.name, f"read-{uuid.uuid4().hex}"
    turns: list[TurnComposed] = []
    try:
        await js.add_consumer(stream, ConsumerConfig(name=name, filter_subject=subject, **_READER))
        reader = await js.pull_subscribe_bind(durable=name, stream=stream)
        try:
            seq = 0
            while seq < last:
                for msg in await reader.fetch(batch=FETCH_BATCH, timeout=FETCH_TIMEOUT_S):
                    seq = msg.metadata.sequence.stream
                    if seq > last:
                        break  # appended after we looked: the caller's append will notice
                    try:
                        event = decode(msg.data, (msg.headers or {}).get("Content-Type"))
                    except msgspec.DecodeError:
                        continue
                    if isinstance(event, TurnComposed):
                        turns.append(event)
        finally:
            await reader.unsubscribe()
    finally:
        # Removed now, not when idle, as a stream takes a limited number of consumers; if
        # this fails, the server removes it after `inactive_threshold`.
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(stream, name)
    return turns, last


FETCH_BATCH = 1000
FETCH_TIMEOUT_S = 5
# Read once and gone: nothing to acknowledge, kept in memory, removed by the server if we die.
_READER = dict(
    ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, mem_storage=True, num_replicas=1,
    inactive_threshold=30,
)
