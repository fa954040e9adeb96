"""A small bus over nats-py JetStream: streams, publishing with de-duplication, durable pull
consumers with explicit acks, bounded redelivery and a dead-letter subject.

Every service uses it the same way:

    bus = await Bus.connect(settings.nats_url, "quota", tracer)
    await bus.declare()
    await bus.consume(PROMPTS, "quota", handle_prompt, stop)

A handler receives the decoded event and returns normally to have the message acked. A
message that does not decode goes to `kiln.deadletter.<service>` with the reason and is
never retried; a handler that raises is retried after a delay, at most `max_deliver` times,
then dead-lettered. Handlers must be idempotent by `request_id`: JetStream redelivers
whatever was not acked (a crash, a timeout), so a message can arrive twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.object_store import ObjectStore
from opentelemetry import trace

from shared import subjects
from shared.events import AnyEvent, Event, decode, encode
from shared.subjects import Stream
from shared.telemetry import context_from_headers, inject_headers

log = logging.getLogger("kiln.bus")

Handler = Callable[[AnyEvent, Msg], Awaitable[None]]

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
                **stream.extra,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Exists with another config (an older Kiln): update it in place.
                await self.js.update_stream(config)
        await self.image_store()

    async def image_store(self) -> ObjectStore:
        try:
            return await self.js.object_store(subjects.IMAGE_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return await self.js.create_object_store(subjects.IMAGE_BUCKET)

    # -- publishing -----------------------------------------------------------------------

    async def publish(self, subject: str, event: Event, *, msg_id: str | None = None) -> bool:
        """Publish to JetStream and wait for the stream's ack. Returns False when the
        stream dropped it as a duplicate of `msg_id` (already published earlier)."""
        headers = inject_headers({})
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        ack = await self.js.publish(subject, encode(event), headers=headers)
        return not ack.duplicate

    async def announce(self, subject: str, event: Event) -> None:
        """Fire-and-forget core NATS publish, for events nobody must keep (progress)."""
        await self.nc.publish(subject, encode(event), headers=inject_headers({}))

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        headers = {
            REASON_HEADER: reason[:1000],
            ORIGINAL_SUBJECT_HEADER: msg.subject,
            # One dead letter per stream message, however often it is redelivered.
            "Nats-Msg-Id": f"{msg.metadata.stream}:{msg.metadata.sequence.stream}",
        }
        await self.js.publish(subjects.dead_letter(self.service), msg.data, headers=headers)
        log.warning("dead-lettered %s: %s", msg.subject, reason)

    # -- consuming ------------------------------------------------------------------------

    async def consume(
        self,
        stream: Stream,
        durable: str,
        handler: Handler,
        stop: asyncio.Event,
        *,
        filter_subject: str | None = None,
        ack_wait_s: float = 60,
        max_deliver: int = 5,
        batch: int = 16,
    ) -> None:
        """Pull messages from a durable consumer and hand each to `handler` until `stop`."""
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_deliver,
            filter_subject=filter_subject,
        )
        subject = filter_subject or stream.subjects[0]
        sub = await self.js.pull_subscribe(subject, durable=durable, stream=stream.name, config=config)
        try:
            while not stop.is_set():
                try:
                    messages = await sub.fetch(batch, timeout=1)
                except TimeoutError:  # nats-py's TimeoutError subclasses it
                    continue  # nothing waiting is normal: poll again
                for msg in messages:
                    await self._deliver(msg, handler, max_deliver)
        finally:
            # The durable consumer stays on the server; only this process stops pulling.
            # (Left subscribed, a pull subscription holds up `drain` until it times out.)
            await sub.unsubscribe()

    async def _deliver(self, msg: Msg, handler: Handler, max_deliver: int) -> None:
        headers = msg.headers or {}
        try:
            event = decode(msg.data, headers.get("Content-Type"))
        except msgspec.DecodeError as error:
            await self.dead_letter(msg, f"undecodable: {error}")
            await msg.term()
            return

        attempt = msg.metadata.num_delivered
        with self.tracer.start_as_current_span(
            f"{self.service} process",
            context=context_from_headers(headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation.type": "process",
                "kiln.request_id": event.request_id,
                "kiln.delivery_attempt": attempt,
            },
        ) as span:
            try:
                await handler(event, msg)
            # A handler may fail on anything (database down, a bug); the message is not
            # lost: it is retried later, and after max_deliver attempts dead-lettered.
            except Exception as error:  # noqa: BLE001
                span.record_exception(error)
                log.exception("handling %s (attempt %d) failed", msg.subject, attempt)
                if attempt >= max_deliver:
                    await self.dead_letter(msg, f"failed {attempt} times: {error!r}")
                    await msg.term()
                else:
                    await msg.nak(delay=min(2.0**attempt, 30.0))
                return
        await msg.ack()
