"""Reading what the streams keep: a request's outcome and a conversation's turns.

Context reads them to compose a turn; the SDK (and through it the CLI and the playground)
reads them to show a request's result and a conversation's history.
"""

from __future__ import annotations

import msgspec

from shared import subjects
from shared.bus import Bus
from shared.events import TERMINAL, ImageDelivered, QuotaDenied, RequestFailed, TurnComposed

Outcome = ImageDelivered | QuotaDenied | RequestFailed


async def read_outcome(bus: Bus, user_id: str, request_id: str) -> Outcome | None:
    """The request's outcome if JetStream holds one."""
    stored = await bus.last_message(subjects.OUTCOMES, subjects.outcome(user_id, request_id))
    if stored is None:
        return None
    try:
        event = stored.event()
    except msgspec.DecodeError:
        return None  # someone else's garbage on our subject: not an outcome
    return event if isinstance(event, TERMINAL) else None


async def read_turns(bus: Bus, user_id: str, conversation_id: str) -> tuple[list[TurnComposed], int]:
    """The conversation's turns in order, and the stream sequence of its last message (0 if
    none): the sequence a new turn must follow."""
    subject = subjects.conversation(user_id, conversation_id)
    last = await bus.last_message(subjects.CONVERSATIONS, subject)
    if last is None:
        return [], 0
    turns = []
    for stored in await bus.read_subject(subjects.CONVERSATIONS, subject, last.seq):
        try:
            event = stored.event()
        except msgspec.DecodeError:
            continue
        if isinstance(event, TurnComposed):
            turns.append(event)
    return turns, last.seq
