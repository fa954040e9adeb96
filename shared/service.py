"""One shape for every service: a declaration of what it does on the bus, and `run`.

A service's `__main__.py` hands `run` one `Service`: how to open its application (handlers
and decisions, no NATS plumbing), the durable consumers it pulls from, the request/reply
subjects it answers, the plain-NATS subjects it listens to, the channels it publishes on,
the streams and buckets it reads directly, and the loops it runs beside them. The bus
refuses anything the declaration does not list (`shared.access.Undeclared`), so the
declaration is complete, and it is what the service's NATS permissions come from.

`run` owns the lifecycle: logging, settings, tracing, metrics, the bus, and a clean stop on
SIGTERM / SIGINT (finish the message in hand, drain the connection, exit 0).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import types
import typing
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from shared import failpoints, subjects
from shared.access import Access
from shared.bus import Bus, Message
from shared.events import Event
from shared.settings import Settings, SettingsError
from shared.subjects import Bucket, Channel, Stream
from shared.telemetry import configure_logging, serve_metrics, setup, shutdown, use_user_ref_key

# How a service builds its application from its settings and bus, and closes it after.
Opener = Callable[[Settings, Bus], AbstractAsyncContextManager[Any]]


class CannotStart(Exception):
    """The service cannot start (its configuration is wrong): one line for the operator."""


@dataclass(frozen=True)
class Consume:
    """A durable pull consumer on `stream`, named `durable`, handing events to `handler`.

    `handler` is a method of the application. It takes one event (`async def
    handle(self, event: QuotaGranted | QuotaDenied)`), or, to handle whatever was waiting at
    once, a list (`async def handle(self, batch: list[Received[PromptSubmitted]])`). The
    event types it accepts are read from that annotation; any other type is dead-lettered.
    """

    stream: Stream
    durable: str
    handler: Callable[..., Awaitable[None]]
    batch: int | Callable[[Settings], int] = 16  # messages fetched at once (or a setting)
    max_attempts: int = 20  # about 8 minutes of back-off: a database outage is ridden out

    @property
    def batched(self) -> bool:
        return typing.get_origin(self._event_annotation()) is list

    @property
    def accepts(self) -> tuple[type[Event], ...]:
        annotation = self._event_annotation()
        if typing.get_origin(annotation) is list:  # list[Received[E]]
            (received,) = typing.get_args(annotation)
            (annotation,) = typing.get_args(received)
        return _union_members(annotation)

    def _event_annotation(self) -> Any:
        hints = typing.get_type_hints(self.handler)
        hints.pop("return", None)
        return next(iter(hints.values()))


@dataclass(frozen=True)
class Answer:
    """A request/reply endpoint: `handler(app, subject)` returns the answer (a msgspec
    Struct or a dict), sent as JSON. An exception is answered `{"error": …}`; one of the
    service's processes answers each request."""

    channel: Channel
    handler: Callable[[Any, str], Awaitable[Any]]


@dataclass(frozen=True)
class Listen:
    """A plain-NATS subscription (nothing kept, nothing acked): `handler(app, message)`.
    Every process of the service hears every message."""

    channel: Channel
    handler: Callable[[Any, Message], Awaitable[None]]


@dataclass(frozen=True)
class Service:
    name: str
    open: Opener
    consumes: tuple[Consume, ...] = ()
    answers: tuple[Answer, ...] = ()
    listens: tuple[Listen, ...] = ()
    publishes: tuple[Channel, ...] = ()
    hears: tuple[Channel, ...] = ()  # subscribed to now and then (the playground following a request)
    reads: tuple[Stream, ...] = ()  # read directly: a subject's last message, a conversation
    buckets: tuple[Bucket, ...] = ()
    tasks: tuple[Callable[[Any, asyncio.Event], Awaitable[None]], ...] = ()  # loops beside the consumers

    def access(self) -> Access:
        """Everything this service may do on the bus. A service may always dead-letter a
        message it cannot handle, on its own dead-letter subject."""
        return Access(
            publish=frozenset({c.pattern for c in self.publishes} | {subjects.dead_letter(self.name)}),
            subscribe=frozenset(
                {c.channel.pattern for c in (*self.answers, *self.listens)} | {c.pattern for c in self.hears}
            ),
            streams=frozenset(s.name for s in (*self.reads, *(c.stream for c in self.consumes))),
            buckets=frozenset(b.name for b in self.buckets),
        )


def run(service: Service) -> None:
    """Run the service until SIGTERM or SIGINT; exit with one line if it cannot start."""
    configure_logging(service.name)
    try:
        settings = Settings.from_env()
        asyncio.run(_main(service, settings))
    except (SettingsError, CannotStart) as error:
        sys.exit(f"{service.name}: {error}")


async def _main(service: Service, settings: Settings) -> None:
    tracer = setup(service.name, settings.otlp_endpoint)
    use_user_ref_key(settings.data_dir)
    serve_metrics(service.name, settings.metrics_port, settings.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    failpoints.arm(settings.failpoint)
    bus = await Bus.connect(settings.nats_address, service.name, tracer, service.access(), settings.nats_creds)
    try:
        if settings.nats_creds is None:
            # With credentials, the launcher's admin declares the streams: a service may
            # not change them. Without, a service starting alone makes what it needs.
            await bus.declare(settings.stream_replicas)
        async with service.open(settings, bus) as app:
            await _serve(service, settings, app, bus, stop)
    finally:
        await bus.close()
        shutdown()


async def _serve(service: Service, settings: Settings, app: Any, bus: Bus, stop: asyncio.Event) -> None:
    subscriptions = [
        *[await bus.answer(a.channel.pattern, _bound(a.handler, app), queue=service.name) for a in service.answers],
        *[await bus.listen(listen.channel.pattern, _bound(listen.handler, app)) for listen in service.listens],
    ]
    try:
        await asyncio.gather(
            *(
                bus.consume(
                    c.stream,
                    c.durable,
                    _bound(c.handler, app),
                    stop,
                    accepts=c.accepts,
                    batched=c.batched,
                    batch=c.batch(settings) if callable(c.batch) else c.batch,
                    max_attempts=c.max_attempts,
                )
                for c in service.consumes
            ),
            *(task(app, stop) for task in service.tasks),
        )
    finally:
        for subscription in subscriptions:
            await subscription.unsubscribe()


def _bound(handler: Callable[..., Any], app: Any) -> Callable[..., Any]:
    """The application's method, bound to the running application."""
    return types.MethodType(handler, app)


def _union_members(annotation: Any) -> tuple[type[Event], ...]:
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if not all(isinstance(kind, type) and issubclass(kind, Event) for kind in members):
        raise TypeError(f"a consumer's handler must be annotated with event types, not {annotation!r}")
    return members


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile: the pause of a polling loop."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
