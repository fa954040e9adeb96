"""Reading what the streams keep: a request's outcome and a conversation's turns.

Context reads them to resolve an edit; the SDK (and through it the CLI and the playground)
reads them to show a request's result and a conversation's history.
"""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

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
    none): the sequence a new turn must follow. One read per turn; conversations are short."""
    subject = subjects.conversation(user_id, conversation_id)
    turns: list[TurnComposed] = []
    last = 0
    while True:
        try:
            raw = await js.get_msg(subjects.CONVERSATIONS.name, seq=last + 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return turns, last
        last = raw.seq
        try:
            event = decode(raw.data or b"", (raw.headers or {}).get("Content-Type"))
        except msgspec.DecodeError:
            continue
        if isinstance(event, TurnComposed):
            turns.append(event)
