"""Durable pull consumers: the loop that hands a service its events, and what happens to a
message that cannot be handled.

A handler receives a checked event of a type it accepts and returns normally to have the
message acked. A message that does not decode, is of another type, or names another user
than its subject goes to `kiln.deadletter.<service>` with the reason and is never retried.
A handler that raises is retried after a delay, `max_attempts` times, then the request ends
as a typed RequestFailed. Handlers must be idempotent by user and request: JetStream
redelivers whatever was not acked (a crash, a timeout), so a message can arrive twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace

from shared import subjects
from shared.events import AnyEvent, Event, RequestFailed, check_ids, decode_message
from shared.subjects import Stream
from shared.telemetry import record_failure, trace_id_of

if TYPE_CHECKING:
    from shared.bus import Bus

log = logging.getLogger("kiln.bus")

E = TypeVar("E", bound=Event)


@dataclass
class Received(Generic[E]):
    """A checked message: its event, the message to ack, and the span continuing its
    request's trace (current while a single-message handler runs)."""

    event: E
    msg: Msg
    span: trace.Span = trace.INVALID_SPAN

    @property
    def trace_id(self) -> str:
        return trace_id_of(self.span)

    @property
    def attempt(self) -> int:
        """How many times JetStream has handed this message out, this time included."""
        return self.msg.metadata.num_delivered


BatchHandler = Callable[[list[Received]], Awaitable[None]]

MAX_BACKOFF_S = 30.0
FETCH_WAIT_S = 0.1  # a pull request waits this long for messages; short, as nats-py may sit out a whole wait
BUS_RETRY_S = 1.0  # a pull the server could not serve (it is restarting) is tried again after this
GIVE_UP_MARGIN = 5  # deliveries beyond max_attempts, to publish the failure itself


async def consume(
    bus: Bus,
    stream: Stream,
    durable: str,
    handler: Callable[[Any], Awaitable[None]],
    stop: asyncio.Event,
    *,
    accepts: tuple[type[Event], ...],
    batched: bool = False,
    max_attempts: int = 20,
    ack_wait_s: float = 60,
    batch: int = 16,
) -> None:
    """Pull messages from a durable consumer and hand the checked events to `handler` until
    `stop` is set: one event per call, or (`batched`) every checked message of a fetch at
    once, so it can do one database transaction for all of them.

    One at a time, each message is acked after its call returns. Batched, they are acked
    together; if the handler raises, each is handled again on its own, so one bad message
    fails alone. A message is tried `max_attempts` times, with back-off after a failure;
    then the request ends as a typed RequestFailed. JetStream may deliver a few times more
    than that, so that the failure can still be published after a crash or a bus hiccup in
    the last attempt.
    """
    if batched:
        handle = handler
    else:

        async def handle(items: list[Received]) -> None:
            (item,) = items
            with trace.use_span(item.span):  # what the handler publishes joins the trace
                await handler(item.event)

    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_attempts + GIVE_UP_MARGIN,
    )
    sub = await bus.pull_subscription(stream, config)
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(batch, timeout=FETCH_WAIT_S)
            except TimeoutError:  # nats-py's TimeoutError subclasses it
                continue  # nothing waiting is normal: poll again
            except nats.errors.Error as error:  # (nats.js.errors too)
                # The server restarting, or its JetStream not back yet (503): a bus outage
                # pauses a service, it does not end it.
                log.warning("cannot pull from %s now, trying again: %s", stream.name, error or type(error).__name__)
                await asyncio.sleep(BUS_RETRY_S)
                continue
            try:
                items = await checked(bus, messages, stream, accepts, max_attempts)
                groups = [items] if batched and items else [[item] for item in items]
                for group in groups:
                    await _handle(bus, group, handle, max_attempts)
            except nats.errors.Error as error:
                # The bus failed us mid-batch (an ack, a nak, a publish): what was not
                # acked, JetStream delivers again.
                log.warning("bus error on %s, will be redelivered: %s", stream.name, error)
    finally:
        # The durable consumer stays on the server; only this process stops pulling.
        # (Left subscribed, a pull subscription holds up `drain` until it times out.)
        await sub.unsubscribe()


async def checked(
    bus: Bus, messages: list[Msg], stream: Stream, accepts: tuple[type[Event], ...], max_attempts: int
) -> list[Received]:
    """The messages a handler should see. What no retry can fix goes to the dead letters
    at once; a message past its attempts ends its request."""
    items = []
    for msg in messages:
        try:
            event = decode_message(msg.data, msg.headers)
        except msgspec.DecodeError as error:
            await _reject(bus, msg, f"undecodable: {error}")
            continue
        problem = _misfit(event, msg.subject, stream, accepts)
        if problem is not None:
            await _reject(bus, msg, problem)
        elif msg.metadata.num_delivered > max_attempts:
            # It failed or crashed its handler every time.
            await give_up(bus, event, msg, f"not handled in {max_attempts} attempts")
        else:
            items.append(Received(event, msg))
    return items


async def _handle(bus: Bus, items: list[Received], handler: BatchHandler, max_attempts: int) -> None:
    # One span per message, continuing each request's own trace.
    for item in items:
        item.span = bus.span(item.event, item.msg)
    try:
        await handler(items)
    # A handler may fail on anything (the database down, a bug); the message is not lost:
    # it is retried with back-off, and after its last attempt the request ends as a typed
    # RequestFailed.
    except Exception as error:  # noqa: BLE001
        for item in items:
            record_failure(item.span, error)
            item.span.end()
        if len(items) > 1:  # find the one that fails: each on its own
            log.warning("a batch of %d failed (%r); handling each on its own", len(items), error)
            for item in items:
                await _handle(bus, [item], handler, max_attempts)
        else:
            (item,) = items
            await retry_or_give_up(bus, item, error, item.msg.metadata.num_delivered, max_attempts)
        return
    for item in items:
        item.span.end()
        await item.msg.ack()


async def retry_or_give_up(bus: Bus, item: Received, error: Exception, attempt: int, max_attempts: int) -> None:
    """After a failed attempt: try again later with back-off, or, after the last one, end
    the request as failed."""
    log.error("handling %s (attempt %d) failed: %r", item.msg.subject, attempt, error, exc_info=error)
    if attempt >= max_attempts:
        await give_up(bus, item.event, item.msg, f"failed {attempt} times, last: {error!r}")
    else:
        await item.msg.nak(delay=min(2.0**attempt, MAX_BACKOFF_S))


async def _reject(bus: Bus, msg: Msg, reason: str) -> None:
    await bus.dead_letter(msg, reason)
    await msg.term()


async def give_up(bus: Bus, event: Event, msg: Msg, reason: str) -> None:
    """End the request as failed: a typed outcome for the client, the message kept as a
    dead letter for the operator."""
    failed = RequestFailed(
        request_id=event.request_id,
        user_id=event.user_id,
        conversation_id=event.conversation_id,
        stage=bus.service,
        reason="gave_up",
        detail=reason,
        plan=getattr(event, "plan", ""),  # known once quota has granted
    )
    await bus.publish(subjects.outcome(event.user_id, event.request_id), failed, first_on_subject=True)
    await _reject(bus, msg, reason)


def _misfit(event: AnyEvent, subject: str, stream: Stream, accepts: tuple[type[Event], ...]) -> str | None:
    """Why a decodable event cannot be handled here, or None if it can."""
    if not isinstance(event, accepts):
        expected = " or ".join(kind.__name__ for kind in accepts)
        return f"expected {expected}, got {type(event).__name__}"
    try:
        check_ids(event)
    except ValueError as error:
        return f"invalid: {error}"
    if stream.user_token is not None and subject.split(".")[stream.user_token] != event.user_id:
        return f"user_id {event.user_id!r} does not match the subject {subject}"
    return None
