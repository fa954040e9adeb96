"""The lifecycle every service process shares: logging, tracing, the bus, and a clean stop
on SIGTERM / SIGINT (finish the message in hand, drain the connection, exit 0)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from shared.bus import Bus
from shared.settings import Settings
from shared.telemetry import configure_logging, serve_metrics, setup, shutdown

Body = Callable[[Settings, Bus, asyncio.Event], Awaitable[None]]


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `stop` is set meanwhile: the pause of a polling loop."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def run(name: str, body: Body) -> None:
    """Run `body(settings, bus, stop)` until a signal sets `stop`."""
    configure_logging(name)
    asyncio.run(_main(name, body))


async def _main(name: str, body: Body) -> None:
    settings = Settings.from_env()
    tracer = setup(name, settings.otlp_endpoint)
    serve_metrics(name, settings.metrics_port, settings.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = await Bus.connect(settings.nats_url, name, tracer)
    try:
        await bus.declare()
        await body(settings, bus, stop)
    finally:
        await bus.close()
        shutdown()
