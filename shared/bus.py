"""A small bus over nats-py JetStream: streams, publishing with de-duplication, durable pull
consumers with explicit acks, bounded redelivery and a dead-letter subject.

Every service uses it the same way:

    bus = await Bus.connect(settings.nats_url, "quota", tracer)
    await bus.declare()
    await bus.consume(PROMPTS, "quota", handle_prompt, stop, accepts=(PromptSubmitted,))

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

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header, StorageType, StreamConfig
from nats.js.object_store import ObjectStore
from opentelemetry import trace

from shared import subjects
from shared.events import AnyEvent, Event, RequestFailed, check_ids, decode, encode
from shared.subjects import Stream
from shared.telemetry import context_from_headers, inject_headers, trace_id_of, user_ref

log = logging.getLogger("kiln.bus")



@dataclass
class Delivery:
    """A checked message: its event, the message to ack, and the span continuing its
    request's trace (current while a single-message handler runs)."""

    event: AnyEvent
    msg: Msg
    span: trace.Span = trace.INVALID_SPAN

    @property
    def trace_id(self) -> str:
        return trace_id_of(self.span)


Handler = Callable[[AnyEvent, Msg], Awaitable[None]]
BatchHandler = Callable[[list[Delivery]], Awaitable[None]]

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-sequence check
CANNOT_CHANGE_MAX_CONSUMERS = 10052  # servers before 2.12: "can not change MaxConsumers"
MAX_BACKOFF_S = 30.0
FETCH_WAIT_S = 0.1  # a pull request waits this long for messages; short, as nats-py may sit out a whole wait
GIVE_UP_MARGIN = 5  # deliveries beyond max_attempts, to publish the failure itself
REASON_HEADER = "Kiln-Dead-Letter-Reason"
ORIGINAL_SUBJECT_HEADER = "Kiln-Original-Subject"


class Bus:
    def __init__(self, nc: NATS, service: str, tracer: trace.Tracer) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.service = service
        self.tracer = tracer

    @classmethod
    async def connect(cls, url: str, service: str, tracer: trace.Tracer) -> Bus:
        async def on_error(error: Exception) -> None:
            log.warning("NATS: %s", error or type(error).__name__)  # one line, not a traceback

        # Reconnect forever: a bus outage pauses the service, it does not end it.
        nc = await nats.connect(
            url, name=f"kiln-{service}", max_reconnect_attempts=-1, error_cb=on_error
        )
        return cls(nc, service, tracer)

    async def close(self) -> None:
        if self.nc.is_connected:
            await self.nc.drain()

    # -- streams --------------------------------------------------------------------------

    async def declare(self) -> None:
        """Create Kiln's streams and image bucket, or bring their config up to date."""
        for stream in subjects.ALL_STREAMS:
            config = StreamConfig(
                name=stream.name,
                subjects=stream.subjects,
                retention=stream.retention,
                storage=StorageType.FILE,
                max_age=stream.max_age_s,
                duplicate_window=stream.duplicate_window_s,
            )
            if stream.max_consumers is not None:
                config.max_consumers = stream.max_consumers
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Exists with another config (an older Kiln): update it in place.
                await self._update_stream(config)
        await self.image_store()

    async def _update_stream(self, config: StreamConfig) -> None:
        try:
            await self.js.update_stream(config)
        except nats.js.errors.APIError as error:
            # Servers before 2.12 cannot change a stream's consumer limit (theirs has none
            # by default): keep the stream's own and change the rest.
            if error.err_code != CANNOT_CHANGE_MAX_CONSUMERS:
                raise
            current = (await self.js.stream_info(config.name)).config
            log.info("%s keeps max_consumers=%s (%s)", config.name, current.max_consumers, error.description)
            config.max_consumers = current.max_consumers
            await self.js.update_stream(config)

    async def image_store(self) -> ObjectStore:
        try:
            return await self.js.object_store(subjects.IMAGE_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_object_store(subjects.IMAGE_BUCKET)

    # -- publishing -----------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        event: Event,
        *,
        msg_id: str | None = None,
        first_on_subject: bool = False,
        after_seq: int | None = None,
    ) -> bool:
        """Publish to JetStream and wait for the stream's ack; False if it was not new.

        `msg_id`: JetStream drops a second message with this id within the stream's
        duplicate window. `after_seq`: JetStream refuses the message unless the subject's
        last message has this stream sequence (0: the subject holds none), which makes
        appends to one subject optimistic-concurrency safe. `first_on_subject` is
        `after_seq=0`: on a per-request outcome subject it makes "one outcome per request"
        hold for as long as the stream keeps it, not only for the window.
        """
        if first_on_subject:
            after_seq = 0
        headers = inject_headers({})
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        if after_seq is not None:
            headers[Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(after_seq)
        try:
            ack = await self.js.publish(subject, encode(event), headers=headers)
        except nats.js.errors.BadRequestError as error:
            if after_seq is not None and error.err_code == WRONG_LAST_SEQUENCE:
                return False  # someone appended first: by us before a crash, or by a twin
            raise
        return not ack.duplicate

    async def announce(self, subject: str, event: Event, span: trace.Span | None = None) -> None:
        """Fire-and-forget core NATS publish, for events nobody must keep (progress), in
        `span`'s trace (default: the current one)."""
        headers = inject_headers({}, trace.set_span_in_context(span) if span is not None else None)
        await self.nc.publish(subject, encode(event), headers=headers)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        original = msg.headers or {}
        headers = {
            REASON_HEADER: reason[:1000],
            ORIGINAL_SUBJECT_HEADER: msg.subject,
            # One dead letter per stream message, however often it is redelivered.
            "Nats-Msg-Id": f"{msg.metadata.stream}:{msg.metadata.sequence.stream}",
            # Kept so the payload stays readable and the request's trace findable.
            **{key: original[key] for key in ("Content-Type", "traceparent") if key in original},
        }
        await self.js.publish(subjects.dead_letter(self.service), msg.data, headers=headers)
        log.warning("dead-lettered %s: %s", msg.subject, reason)

    async def outcome_recorded(self, user_id: str, request_id: str) -> bool:
        try:
            await self.js.get_last_msg(subjects.OUTCOMES.name, subjects.outcome(user_id, request_id))
        except nats.js.errors.NotFoundError:
            return False
        return True

    # -- consuming ------------------------------------------------------------------------

    async def consume(
        self,
        stream: Stream,
        durable: str,
        handler: Handler,
        stop: asyncio.Event,
        *,
        accepts: tuple[type[Event], ...],
        max_attempts: int = 20,
        ack_wait_s: float = 60,
        batch: int = 16,
    ) -> None:
        """Pull messages from a durable consumer and hand each event of an `accepts` type
        to `handler` until `stop` is set.

        A message is tried `max_attempts` times, with back-off after a failure (20 tries
        ride out about 8 minutes of a database outage). Then the request ends as a typed
        RequestFailed. JetStream may deliver a few times more than that, so that the
        failure can still be published after a crash or a bus hiccup in the last attempt.
        """

        async def handle_one(items: list[Delivery]) -> None:
            (item,) = items
            with trace.use_span(item.span):  # what the handler publishes joins the trace
                await handler(item.event, item.msg)

        await self.consume_batches(
            stream, durable, handle_one, stop, accepts=accepts, max_attempts=max_attempts,
            ack_wait_s=ack_wait_s, batch=batch, one_at_a_time=True,
        )

    async def consume_batches(
        self,
        stream: Stream,
        durable: str,
        handler: BatchHandler,
        stop: asyncio.Event,
        *,
        accepts: tuple[type[Event], ...],
        max_attempts: int = 20,
        ack_wait_s: float = 60,
        batch: int = 16,
        one_at_a_time: bool = False,
    ) -> None:
        """Like `consume`, but `handler` gets every checked message of a fetch at once
        (whatever was waiting, up to `batch`), so it can do one database transaction for
        all of them. They are acked together after it returns. If it raises, each message
        is handled again on its own, so one bad message fails alone. (`one_at_a_time`:
        the handler gets one message per call, acked on its own; what `consume` uses.)"""
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_attempts + GIVE_UP_MARGIN,
        )
        # Creates the durable consumer, or brings an existing one's config up to date.
        await self.js.add_consumer(stream.name, config)
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream.name)
        try:
            while not stop.is_set():
                try:
                    messages = await sub.fetch(batch, timeout=FETCH_WAIT_S)
                except TimeoutError:  # nats-py's TimeoutError subclasses it
                    continue  # nothing waiting is normal: poll again
                try:
                    items = await self.checked(messages, stream, accepts, max_attempts)
                    # Each message acked (or retried) on its own, or the batch together.
                    groups = [[item] for item in items] if one_at_a_time else [items] if items else []
                    for group in groups:
                        await self._handle(group, handler, max_attempts)
                except nats.errors.Error as error:
                    # The bus failed us mid-batch (an ack, a nak, a publish): what was not
                    # acked, JetStream delivers again.
                    log.warning("bus error on %s, will be redelivered: %s", stream.name, error)
        finally:
            # The durable consumer stays on the server; only this process stops pulling.
            # (Left subscribed, a pull subscription holds up `drain` until it times out.)
            await sub.unsubscribe()

    async def checked(
        self, messages: list[Msg], stream: Stream, accepts: tuple[type[Event], ...], max_attempts: int
    ) -> list[Delivery]:
        """The messages a handler should see. What no retry can fix goes to the dead
        letters at once; a message past its attempts ends its request."""
        items = []
        for msg in messages:
            try:
                event = decode(msg.data, (msg.headers or {}).get("Content-Type"))
            except msgspec.DecodeError as error:
                await self._reject(msg, f"undecodable: {error}")
                continue
            problem = _misfit(event, msg.subject, stream, accepts)
            if problem is not None:
                await self._reject(msg, problem)
            elif msg.metadata.num_delivered > max_attempts:
                # It failed or crashed its handler every time.
                await self.give_up(event, msg, f"not handled in {max_attempts} attempts")
            else:
                items.append(Delivery(event, msg))
        return items

    async def _handle(self, items: list[Delivery], handler: BatchHandler, max_attempts: int) -> None:
        # One span per message, continuing each request's own trace.
        for item in items:
            item.span = self.span(item.event, item.msg)
        try:
            await handler(items)
        # A handler may fail on anything (the database down, a bug); the message is not
        # lost: it is retried with back-off, and after its last attempt the request ends
        # as a typed RequestFailed.
        except Exception as error:  # noqa: BLE001
            for item in items:
                item.span.record_exception(error)
                item.span.end()
            if len(items) > 1:  # find the one that fails: each on its own
                log.warning("a batch of %d failed (%r); handling each on its own", len(items), error)
                for item in items:
                    await self._handle([item], handler, max_attempts)
            else:
                for item in items:
                    await self._retry_or_give_up(item.event, item.msg, error, max_attempts)
            return
        for item in items:
            item.span.end()
            await item.msg.ack()

    def span(self, event: AnyEvent, msg: Msg) -> trace.Span:
        """The span of handling one message, continuing its request's trace. Subjects name
        users, so the span names the stream instead, and the user only hashed."""
        return self.tracer.start_span(
            f"{self.service} {type(event).__name__}",
            context=context_from_headers(msg.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.metadata.stream,
                "messaging.operation.type": "process",
                "kiln.request_id": event.request_id,
                "kiln.user": user_ref(event.user_id),
                "kiln.delivery_attempt": msg.metadata.num_delivered,
            },
        )

    async def _retry_or_give_up(self, event: AnyEvent, msg: Msg, error: Exception, max_attempts: int) -> None:
        attempt = msg.metadata.num_delivered
        log.error("handling %s (attempt %d) failed: %r", msg.subject, attempt, error, exc_info=error)
        if attempt >= max_attempts:
            await self.give_up(event, msg, f"failed {attempt} times, last: {error!r}")
        else:
            await msg.nak(delay=min(2.0**attempt, MAX_BACKOFF_S))

    async def _reject(self, msg: Msg, reason: str) -> None:
        await self.dead_letter(msg, reason)
        await msg.term()

    async def give_up(self, event: Event, msg: Msg, reason: str) -> None:
        """End the request as failed: a typed outcome for the client, the message kept
        as a dead letter for the operator."""
        failed = RequestFailed(
            request_id=event.request_id,
            user_id=event.user_id,
            conversation_id=event.conversation_id,
            stage=self.service,
            reason="gave_up",
            detail=reason,
            plan=getattr(event, "plan", ""),  # known once quota has granted
        )
        await self.publish(subjects.outcome(event.user_id, event.request_id), failed, first_on_subject=True)
        await self._reject(msg, reason)


def _misfit(event: Event, subject: str, stream: Stream, accepts: tuple[type[Event], ...]) -> str | None:
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
