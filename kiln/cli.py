"""The `kiln` command line.

    kiln up                                   start the whole platform (what `make run` does)
    kiln generate "a red circle" --user alice -o out.png
    kiln accounts add|set-plan|list|grant    users, plans and admin grants
    kiln audit replay|verify|export|rebuild  check the quota log

Exit codes of `generate`: 0 delivered, 2 denied by quota, 3 failed, 4 no outcome in time,
64 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import NoReturn

import httpx
import nats.errors
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kiln import admin
from kiln.client import KilnClient
from shared.events import ImageDelivered, QuotaDenied, RenderProgress
from shared import telemetry
from shared.settings import Settings

EXIT_DENIED, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE = 2, 3, 4, 64

console = Console(stderr=True, soft_wrap=True)  # one message, one line


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad arguments; here 2 means "denied", so usage errors get 64."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"kiln: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="kiln", description="Kiln image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the platform (embedded servers unless KILN_*_URL are set)")
    up.set_defaults(run=_up)

    generate = commands.add_parser("generate", help="generate an image from a prompt")
    generate.add_argument("prompt")
    generate.add_argument("--user", required=True, help="the user asking (letters, digits, _ and -)")
    generate.add_argument("-o", "--output", type=Path, help="where to write the PNG")
    generate.add_argument("--conversation", default="", help="conversation id")
    generate.add_argument("--request-id", help="idempotency key (default: a new one)")
    generate.add_argument("--size", type=int, default=32, help="width and height in pixels")
    generate.add_argument("--steps", type=int, default=10)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--timeout", type=float, default=120, help="seconds to wait for the outcome")
    generate.set_defaults(run=_generate)

    admin.add_commands(commands)

    args = parser.parse_args(argv)
    return args.run(args)


def _generate(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_generate_async(args))
    except ValueError as error:
        console.print(f"kiln: {error}")
        return EXIT_USAGE


async def _generate_async(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    # The CLI's span is the root of the request's trace.
    telemetry.setup("kiln-cli", settings.otlp_endpoint)
    try:
        return await _generate_traced(args, settings)
    finally:
        telemetry.shutdown()  # flush the spans before the process exits


async def _generate_traced(args: argparse.Namespace, settings: Settings) -> int:
    try:
        client = await KilnClient.connect(settings.nats_url)
    except (OSError, TimeoutError, nats.errors.Error) as error:
        console.print(f"kiln: cannot reach NATS at {settings.nats_url} ({error}); is Kiln up (`make run`)?")
        return EXIT_FAILED
    # Chosen here, not by the SDK, so that every message can name it: re-running with the
    # same --request-id picks the request up where it is, without spending quota again.
    request_id = args.request_id or uuid.uuid4().hex
    async with client:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=console, transient=True,
        ) as bar:
            task = bar.add_task("waiting for quota", total=args.steps)

            def on_progress(event: RenderProgress) -> None:
                if event.state == "queued":
                    eta = f", about {event.eta_s:.0f} s" if event.eta_s is not None else ""
                    bar.update(task, description=f"queued: #{event.queue_position}{eta}")
                else:
                    bar.update(task, description="rendering", completed=event.step, total=event.total_steps)

            try:
                outcome = await client.generate(
                    args.prompt,
                    user_id=args.user,
                    conversation_id=args.conversation,
                    request_id=request_id,
                    width=args.size,
                    height=args.size,
                    steps=args.steps,
                    seed=args.seed,
                    on_progress=on_progress,
                    timeout_s=args.timeout,
                )
            except TimeoutError as error:
                console.print(f"kiln: {error}; to keep waiting, run the same command with --request-id {request_id}")
                return EXIT_TIMEOUT
            except nats.errors.Error as error:
                console.print(
                    f"kiln: the bus at {settings.nats_url} failed ({error}); is Kiln up (`make run`)? "
                    f"Retry with --request-id {request_id}"
                )
                return EXIT_FAILED

        if isinstance(outcome, QuotaDenied):
            retry = f" (try again after {outcome.retry_at:%Y-%m-%d %H:%M} UTC)" if outcome.retry_at else ""
            console.print(f"denied: {outcome.reason}: {outcome.detail}{retry}")
            return EXIT_DENIED
        if not isinstance(outcome, ImageDelivered):
            console.print(f"failed at {outcome.stage}: {outcome.reason}: {outcome.detail}")
            return EXIT_FAILED
        if not args.output:
            console.print(f"image ready: {outcome.url}")
            return 0
        try:
            png = await client.download(outcome)
            args.output.write_bytes(png)
        except (httpx.HTTPError, OSError) as error:
            console.print(f"kiln: the image is ready at {outcome.url} but was not saved to {args.output}: {error}")
            return EXIT_FAILED
        console.print(f"wrote {args.output} ({len(png)} bytes); link: {outcome.url}")
        return 0


def _up(args: argparse.Namespace) -> int:
    from infra.platform import Platform

    platform = Platform.from_env()
    # SIGTERM stops Kiln the way Ctrl-C does, at any point, startup included. (SIGINT is
    # set too: a shell starting us in the background would have us ignore it.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        console.print("starting Kiln …")
        asyncio.run(platform.start())
        console.print(
            "Kiln is up.\n"
            f"{platform.describe()}\n"
            'Try: .venv/bin/kiln generate "a red circle" --user alice -o out.png\n'
            "Ctrl-C stops everything."
        )
        _supervise(platform)
    except KeyboardInterrupt:
        pass
    # The command's boundary: whatever stopped the start, say it in one line.
    except Exception as error:  # noqa: BLE001
        console.print(f"kiln up: {type(error).__name__}: {error}")
        return 1
    finally:
        # A second Ctrl-C must not cut the stop short and leave servers running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console.print("stopping Kiln …")
        platform.stop()
    return 0


def _supervise(platform) -> None:
    """Restart a service that exits on its own; runs until Ctrl-C."""
    while True:
        for name, process in list(platform.services.items()):
            if process.poll() is not None:
                log = platform.log_dir / f"{name}.log"
                console.print(f"{name} exited with {process.returncode}; restarting it (log: {log})")
                platform.start_service(name)
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
