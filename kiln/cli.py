"""The `kiln` command line.

    kiln up                                   start the whole platform (what `make run` does)
    kiln generate "a red circle" --user alice -o out.png
    kiln edit IMAGE_ID "make it blue" --user alice -o blue.png
    kiln cancel REQUEST_ID --user alice       stop a request that has not ended (refunded)
    kiln chat --user alice                    draw, then edit in words, in the terminal
    kiln quota --user alice                   images used and left today
    kiln status                               a live view of the render fleet
    kiln fleet restart render                 replace a service's processes one at a time (`kiln up`'s)
    kiln accounts add|set-plan|list|grant    users, plans and admin grants
    kiln audit replay|verify|export|rebuild  check the quota log

Exit codes of `generate` and `edit`: 0 delivered, 2 denied by quota, 3 failed, 4 no outcome in time,
64 bad arguments, 130 Ctrl-C (the request goes on). Of `cancel`: 0 cancelled, 3 it had already
ended, 4 it did not end in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import io
import math
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NoReturn

import httpx
import nats.errors
from opentelemetry import trace
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kiln import admin, fleet_control, status
from kiln.client import KilnClient, ServiceUnavailable
from kiln.credentials import for_command as credentials_for
from kiln.credentials import login as credentials_login
from kiln.credentials import login_over_http as credentials_login_over_http
from shared import model_card, quoted, telemetry
from shared.events import (
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    ID_PATTERN,
    ImageDelivered,
    QuotaDenied,
    RenderProgress,
    RequestFailed,
)
from shared.records import Outcome
from shared.settings import SERVICES, Settings, SettingsError
from shared.telemetry import trace_id_of

EXIT_DENIED, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, EXIT_INTERRUPTED = 2, 3, 4, 64, 130
# `kiln login --http`'s password, for scripts. Read where it is used, not a Settings field:
# a secret for one command, which no service or other command should carry.
PASSWORD_VARIABLE = "KILN_PASSWORD"
VIEWABLE_PX = 256  # a saved image's longer side, at least, unless --native: 32 px is a thumbnail
CHAT_ENDS = {"quit", "exit", "/quit", "/exit"}  # typed alone, these end a chat instead of drawing

console = Console(stderr=True, soft_wrap=True)  # one message, one line
tracer = trace.get_tracer("kiln.cli")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad arguments; here 2 means "denied", so usage errors get 64."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"kiln: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="kiln", description="Kiln image generation")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the platform (embedded servers unless KILN_*_URL are set)")
    up.add_argument(
        "--nats-cluster",
        type=int,
        choices=(1, 3, 5),
        help="embedded nats-servers, as one JetStream cluster with R3 streams (default: KILN_NATS_CLUSTER, 1)",
    )
    up.set_defaults(run=_up)

    login = commands.add_parser(
        "login",
        help="act as one user from now on: a .creds file, or sign in to the playground with --http",
        description="kiln login FILE keeps a credential (from `kiln accounts add-user` or the playground's "
        "CLI access); kiln login --http URL --user NAME signs in to the playground (the password is asked for, "
        f"or read from {PASSWORD_VARIABLE}) and fetches one.",
    )
    login.add_argument("credentials", type=Path, nargs="?", help="the .creds file")
    login.add_argument("--http", metavar="URL", help="the playground's address, e.g. http://127.0.0.1:8480")
    login.add_argument("--user", help="the playground account to sign in as (with --http)")
    login.set_defaults(run=_login)

    generate = commands.add_parser("generate", help="generate an image from a prompt")
    generate.add_argument("prompt")
    _request_arguments(generate)
    generate.add_argument("--conversation", default="", help="conversation id")
    generate.add_argument("--style", help="a style preset for the conversation ('none' drops it)")
    generate.set_defaults(run=_command(_generate))

    edit = commands.add_parser("edit", help='edit an earlier image: kiln edit IMAGE_ID "make it blue"')
    edit.add_argument("image_id", help="the request id of the image to edit")
    edit.add_argument("prompt", help="what to change")
    _request_arguments(edit)
    edit.add_argument("--strength", type=float, default=0.8, help="how far from the image it may go, 0..1")
    edit.set_defaults(run=_command(_edit))

    cancel = commands.add_parser("cancel", help="cancel a request that has not ended: kiln cancel REQUEST_ID")
    cancel.add_argument("request_id", help="the request to cancel (printed by generate, edit and Ctrl-C)")
    cancel.add_argument("--user", required=True, help="whose request it is")
    cancel.add_argument("--timeout", type=float, default=30, help="seconds to wait for the request to end")
    cancel.set_defaults(run=_command(_cancel))

    chat = commands.add_parser("chat", help="an interactive conversation: draw, then edit in words")
    chat.add_argument("--user", required=True, help="the user asking (letters, digits, _ and -)")
    chat.add_argument("--conversation", help="continue this conversation (default: a new one)")
    chat.add_argument("--style", help="a style preset to start with")
    chat.add_argument("--size", type=int, help="width and height in pixels (default: the model's for the prompt)")
    chat.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    chat.add_argument("--save", type=Path, help="a folder to write each image to")
    chat.add_argument("--native", action="store_true", help="save the model's pixels, not scaled up")
    chat.set_defaults(run=_command(_chat))

    status = commands.add_parser("status", help="a live view of the render fleet (Ctrl-C ends it)")
    status.add_argument("--once", action="store_true", help="listen for 2.5 s, print one view and exit")
    status.set_defaults(run=_command(_status))

    fleet = commands.add_parser("fleet", help="the processes `kiln up` runs on this host")
    fleet_commands = fleet.add_subparsers(dest="fleet_command", required=True)
    restart = fleet_commands.add_parser(
        "restart", help="replace a service's processes one at a time: drain, exit, the new one ready, the next"
    )
    restart.add_argument("service", choices=SERVICES)
    restart.add_argument("--timeout", type=float, default=600, help="seconds to wait for the whole restart")
    restart.set_defaults(run=_fleet_restart)

    quota = commands.add_parser("quota", help="images used and left today")
    quota.add_argument("--user", required=True)
    quota.set_defaults(run=_command(_quota))

    admin.add_commands(commands)

    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # to print a command that picks the request up again
    return args.run(args)


def _request_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="the user asking (letters, digits, _ and -)")
    parser.add_argument("-o", "--output", type=Path, help="where to write the PNG")
    parser.add_argument(
        "--native", action="store_true", help=f"write the model's pixels (default: scaled up to {VIEWABLE_PX} px)"
    )
    parser.add_argument("--request-id", help="idempotency key (default: a new one)")
    parser.add_argument(
        "--size",
        type=int,
        help=f"width and height in pixels (default {DEFAULT_SIZE}; for quoted text, the text model's)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the outcome")


Command = Callable[[KilnClient, argparse.Namespace, Settings], Awaitable[int]]


def _command(body: Command) -> Callable[[argparse.Namespace], int]:
    """Run a command that talks to Kiln: tracing set up (the CLI's span is the root of the
    request's trace), the bus connected, and its failures said in one line."""

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_connected(body, args))
        except ValueError as error:
            console.print(f"kiln: {error}")
            return EXIT_USAGE
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


async def _connected(body: Command, args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    credentials, identity = credentials_for(settings, getattr(args, "user", None))
    telemetry.setup("kiln-cli", settings.otlp_endpoint)
    telemetry.use_user_ref_key(settings.data_dir)  # where the CLI runs beside the platform
    try:
        try:
            client = await KilnClient.connect(settings.nats_address, credentials, identity)
        except (OSError, TimeoutError, nats.errors.Error) as error:
            console.print(f"kiln: cannot reach NATS at {settings.nats_address} ({error}); is Kiln up (`make run`)?")
            return EXIT_FAILED
        async with client:
            try:
                return await body(client, args, settings)
            except (ServiceUnavailable, nats.errors.Error) as error:
                console.print(f"kiln: {error or type(error).__name__}; is Kiln up (`make run`)?")
                return EXIT_FAILED
    finally:
        telemetry.shutdown()  # flush the spans before the process exits


async def _generate(client: KilnClient, args: argparse.Namespace, settings: Settings) -> int:
    return await _one_request(client, args, settings, conversation_id=args.conversation, style=args.style)


async def _edit(client: KilnClient, args: argparse.Namespace, settings: Settings) -> int:
    # The edit joins the conversation its image came from, so "the last one" there is it.
    source = await client.recorded_outcome(args.user, args.image_id)
    if not isinstance(source, ImageDelivered):
        console.print(f"kiln: {args.user} has no image from request {args.image_id}")
        return EXIT_FAILED
    return await _one_request(
        client,
        args,
        settings,
        conversation_id=source.conversation_id,
        edit_of=args.image_id,
        strength=args.strength,
    )


def _side(size: int | None, prompt: str, settings: Settings) -> int:
    """`--size`, else the side of the model that draws the prompt: for quoted text the text
    model's (from the local model card), else the default."""
    if size is not None:
        return size
    if quoted.find(prompt) is not None:
        try:
            card = model_card.text_card(settings.model_path)
        except model_card.CardError:
            card = None  # quota names the sizes
        if card is not None and card.sizes:
            return max(card.sizes)
    return DEFAULT_SIZE


async def _one_request(client: KilnClient, args: argparse.Namespace, settings: Settings, **fields) -> int:
    # Chosen here, not by the SDK, so that every message can name it: re-running with the
    # same --request-id picks the request up where it is, without spending quota again.
    request_id = args.request_id or uuid.uuid4().hex
    with _request_trace(settings) as trace_link:
        try:
            outcome = await _draw_with_progress(
                client,
                args.prompt,
                user_id=args.user,
                request_id=request_id,
                width=_side(args.size, args.prompt, settings),
                height=_side(args.size, args.prompt, settings),
                steps=args.steps,
                seed=args.seed,
                timeout_s=args.timeout,
                **fields,
            )
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us, then raises KeyboardInterrupt
            _say_interrupted(args.user, request_id, _wait_again(args, request_id))
            raise
        except TimeoutError as error:
            _say(f"kiln: {error}; it may still finish. To keep waiting: {_wait_again(args, request_id)}")
            console.print(f"trace: {await _original_trace(client, settings, args, request_id, trace_link)}")
            return EXIT_TIMEOUT
        except nats.errors.Error as error:
            console.print(
                f"kiln: the bus at {settings.nats_address} failed ({error}); is Kiln up (`make run`)? "
                f"Retry with --request-id {request_id}"
            )
            return EXIT_FAILED
    code = await _say_outcome(client, outcome)
    console.print(f"trace: {await _original_trace(client, settings, args, request_id, trace_link)}")
    if code or not args.output:
        return code
    return await _save(client, outcome, args.output, native=args.native)


@contextlib.contextmanager
def _request_trace(settings: Settings) -> Iterator[str]:
    """The CLI's span, the root of the request's trace; yields where to see that trace
    (a tracing UI's page, or the bare trace id), known before any outcome is."""
    with tracer.start_as_current_span("kiln cli", kind=trace.SpanKind.CLIENT) as span:
        trace_id = trace_id_of(span)
        yield settings.trace_link(trace_id) or trace_id


async def _original_trace(
    client: KilnClient, settings: Settings, args: argparse.Namespace, request_id: str, own_link: str
) -> str:
    """Where to see the request's trace. A re-run with --request-id waits in a trace of its
    own, without the render: link the one the request was first submitted in. (A new
    request's first submission is this command's own, so no look-up is needed.)"""
    if not args.request_id:
        return own_link
    try:
        trace_id = await client.trace_id(args.user, request_id)
    except (TimeoutError, nats.errors.Error):  # a credential from before decisions were readable, say
        trace_id = None
    if trace_id is None:
        return own_link
    return settings.trace_link(trace_id) or trace_id


def _say_interrupted(user_id: str, request_id: str, wait_again: str) -> None:
    """Ctrl-C stops the waiting, not the request: say so, and how to cancel it or wait on."""
    cancel = [*_program(), "cancel", request_id, "--user", user_id]
    _say(
        f"interrupted: request {request_id} goes on, and is charged unless you cancel it.\n"
        f"  to cancel it:    {shlex.join(cancel)}\n"
        f"  to keep waiting: {wait_again}"
    )


def _wait_again(args: argparse.Namespace, request_id: str) -> str:
    """This very command, with the request's id: run again, it waits for the same request."""
    again = args.argv if args.request_id else [*args.argv, "--request-id", request_id]
    return shlex.join([*_program(), *again])


def _program() -> list[str]:
    """How to start `kiln` again: as it was typed, or (run as `python -m kiln`) the module."""
    if Path(sys.argv[0]).name == "kiln":
        return [sys.argv[0]]
    return [sys.executable, "-m", "kiln"]


def _say(text: str) -> None:
    """Print a line holding the user's own words: no rich markup read into them."""
    console.print(text, markup=False, highlight=False)


async def _draw(client: KilnClient, settings: Settings, prompt: str, **fields) -> tuple[Outcome, str]:
    """One request, with a progress bar while it waits and renders; its outcome and where
    to see its trace."""
    with _request_trace(settings) as trace_link:
        return await _draw_with_progress(client, prompt, **fields), trace_link


async def _draw_with_progress(client: KilnClient, prompt: str, **fields) -> Outcome:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("waiting for quota", total=fields.get("steps", 10))

        def on_progress(event: RenderProgress) -> None:
            if event.state == "queued":
                eta = f", about {event.eta_s:.0f} s" if event.eta_s is not None else ""
                bar.update(task, description=f"queued: #{event.queue_position}{eta}")
            else:
                bar.update(task, description="rendering", completed=event.step, total=event.total_steps)

        return await client.generate(prompt, on_progress=on_progress, **fields)


async def _say_outcome(client: KilnClient, outcome: Outcome) -> int:
    """One line on what became of the request (with a link signed now for an image); the
    exit code it means."""
    if isinstance(outcome, QuotaDenied):
        retry = f" (try again after {outcome.retry_at:%Y-%m-%d %H:%M} UTC)" if outcome.retry_at else ""
        _say(f"denied: {outcome.reason}: {outcome.detail}{retry}")
        return EXIT_DENIED
    if not isinstance(outcome, ImageDelivered):
        _say(f"failed at {outcome.stage}: {outcome.reason}: {outcome.detail}")
        return EXIT_FAILED
    _say(f"image {outcome.request_id} drawn as: {outcome.prompt}")
    if outcome.composition is not None and outcome.composition.degraded:
        _say(f"note: drawn with less than asked while Kiln is busy: {outcome.composition.degraded}")
    try:
        link = await client.link(outcome.user_id, outcome.request_id)
    except ServiceUnavailable as error:
        # The image is drawn and kept: only its link is missing, and can be asked for again.
        console.print(f"link: none for now ({error})")
    else:
        console.print(f"link: {link.url}")
    return 0


async def _save(client: KilnClient, outcome: ImageDelivered, path: Path, native: bool = False) -> int:
    try:
        png = await client.download(outcome)
        if not native:
            png = viewable(png)
        path.write_bytes(png)
    except (httpx.HTTPError, OSError, ServiceUnavailable) as error:
        console.print(f"kiln: the image {outcome.image_key} is ready but was not saved to {path}: {error}")
        return EXIT_FAILED
    width, height = Image.open(io.BytesIO(png)).size
    console.print(f"wrote {path} ({width}×{height}, {len(png)} bytes)")
    return 0


def viewable(png: bytes, at_least: int = VIEWABLE_PX) -> bytes:
    """The image scaled up by a whole factor until its longer side is at least `at_least`
    pixels, as it was if it is that big already. Nearest neighbour: each of the model's
    pixels becomes a crisp square, nothing is made up between them."""
    image = Image.open(io.BytesIO(png))
    factor = math.ceil(at_least / max(image.size))
    if factor <= 1:
        return png
    scaled = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    out = io.BytesIO()
    scaled.save(out, format="PNG")
    return out.getvalue()


async def _cancel(client: KilnClient, args: argparse.Namespace, settings: Settings) -> int:
    _check_ids(("--user", args.user), ("REQUEST_ID", args.request_id))
    # 1. A request that has ended is past cancelling: say how it ended.
    ended = await client.recorded_outcome(args.user, args.request_id)
    if ended is not None:
        _say(f"request {args.request_id} had already ended, {_ending(ended)}; nothing to cancel")
        return EXIT_FAILED
    # 2. Ask render to drop it. The cancel is kept in a stream: a request still in quota or
    #    context, or waiting in the queue, is dropped when it reaches render.
    await client.cancel(args.user, args.request_id)
    # 3. Wait for its end: cancelled, or what it became just before the cancel reached it.
    try:
        outcome = await client.wait_for_outcome(args.user, args.request_id, timeout_s=args.timeout)
    except TimeoutError:
        _say(
            f"kiln: cancel sent, but request {args.request_id} of {args.user} did not end within "
            f"{args.timeout:g} s; if it exists, render drops it when it gets there"
        )
        return EXIT_TIMEOUT
    if isinstance(outcome, RequestFailed) and outcome.reason == "cancelled":
        _say(f"cancelled request {args.request_id} ({outcome.detail}); it is not charged")
        return 0
    _say(f"request {args.request_id} ended before the cancel reached it, {_ending(outcome)}")
    return EXIT_FAILED


def _check_ids(*named: tuple[str, str]) -> None:
    """Ids become subject tokens: refuse, as a usage error, one that cannot be."""
    for name, value in named:
        if not ID_PATTERN.match(value):
            raise ValueError(f"{name} must be 1-64 letters, digits, _ or - but is {value!r}")


def _ending(outcome: Outcome) -> str:
    """How a request ended, in a few words."""
    if isinstance(outcome, ImageDelivered):
        return f"delivered: {outcome.image_key}"
    if isinstance(outcome, QuotaDenied):
        return f"denied ({outcome.reason}): {outcome.detail}"
    return f"failed at {outcome.stage} ({outcome.reason}): {outcome.detail}"


async def _status(client: KilnClient, args: argparse.Namespace, settings: Settings) -> int:
    view = await status.show(client, once=args.once)
    if args.once:
        Console(width=160).print(view)
    return 0


async def _quota(client: KilnClient, args: argparse.Namespace, settings: Settings) -> int:
    status = await client.quota(args.user)
    print(
        f"{status.user_id} ({status.plan} plan): {status.used} of {status.limit} images used today, "
        f"{status.left} left; resets {status.resets_at:%Y-%m-%d %H:%M} UTC"
    )
    return 0


CHAT_HELP = (
    'Type a prompt to draw it; then say what to change ("make it blue", "on a green background") to edit '
    "the last image. /style NAME picks a style (/style none drops it), /styles lists them, "
    "/new starts a new conversation, /quota shows what is left, quit (or exit, /quit, Ctrl-D) ends."
)


async def _chat(client: KilnClient, args: argparse.Namespace, settings: Settings) -> int:
    conversation = args.conversation or f"c-{uuid.uuid4().hex[:16]}"
    _check_ids(("--user", args.user), ("--conversation", conversation))
    style = args.style
    console.print(f"conversation {conversation}. {CHAT_HELP}")
    if args.conversation:
        for turn in await client.conversation(args.user, conversation):
            console.print(f"  earlier: {turn.composition.text!r} → {turn.prompt!r} ({turn.request_id})")
    while True:
        try:
            line = (await _ask("you> ")).strip()
        except EOFError:
            console.print()
            return 0
        if not line:
            continue
        if line.lower() in CHAT_ENDS:
            return 0
        command, _, rest = line.partition(" ")
        try:
            if command == "/new":
                conversation, style = f"c-{uuid.uuid4().hex[:16]}", None
                console.print(f"conversation {conversation}")
            elif command == "/style":
                style = rest.strip() or None
                console.print(f"style: {style or 'the conversation’s'} from the next prompt on")
            elif command == "/styles":
                styles = await client.styles()
                console.print(", ".join(f"{name} ({title})" for name, title in styles.items()) or "no styles")
            elif command == "/quota":
                await _quota(client, args, settings)
            elif command.startswith("/"):
                console.print(CHAT_HELP)
            elif await _chat_turn(client, args, settings, conversation, line, style):
                style = None  # drawn once in it, the style stays with the conversation
        except (ServiceUnavailable, TimeoutError, nats.errors.Error, ValueError) as error:
            console.print(f"kiln: {error or type(error).__name__}")


async def _chat_turn(
    client: KilnClient, args: argparse.Namespace, settings: Settings, conversation: str, text: str, style: str | None
) -> bool:
    """Draw one turn; whether an image came of it."""
    request_id = uuid.uuid4().hex  # chosen here, so that Ctrl-C can name it
    try:
        outcome, trace_link = await _draw(
            client,
            settings,
            text,
            user_id=args.user,
            request_id=request_id,
            conversation_id=conversation,
            style=style,
            width=_side(args.size, text, settings),
            height=_side(args.size, text, settings),
            steps=args.steps,
        )
    except asyncio.CancelledError:  # Ctrl-C ends the chat, not the request in flight
        _say_interrupted(args.user, request_id, _wait_for_turn(args, conversation, text, request_id))
        raise
    delivered = await _say_outcome(client, outcome) == 0
    console.print(f"trace: {trace_link}")
    if not delivered:
        return False
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        await _save(client, outcome, args.save / f"{outcome.request_id}.png", native=args.native)
    return True


def _wait_for_turn(args: argparse.Namespace, conversation: str, text: str, request_id: str) -> str:
    """The `generate` that waits for a chat turn's request (the same prompt, should it
    have to be submitted again: it is idempotent)."""
    command = [*_program(), "generate", text, "--user", args.user, "--conversation", conversation]
    if args.size is not None:
        command += ["--size", str(args.size)]
    if args.steps != DEFAULT_STEPS:
        command += ["--steps", str(args.steps)]
    return shlex.join([*command, "--request-id", request_id])


async def _ask(prompt: str) -> str:
    """input() without blocking the event loop, on a daemon thread: Ctrl-C ends the chat at
    once instead of waiting for a line that never comes."""
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def settle(result: str | None, error: BaseException | None) -> None:
        if answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result or "")

    def read() -> None:
        try:
            line, error = input(prompt), None
        except BaseException as raised:  # noqa: BLE001 — EOFError (stdin closed) and the rest go to the waiting loop
            line, error = None, raised
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(settle, line, error)

    threading.Thread(target=read, daemon=True).start()
    return await answer


def _login(args: argparse.Namespace) -> int:
    if (args.credentials is None) == (args.http is None) or (args.http is not None) != (args.user is not None):
        console.print("kiln login: give a .creds file, or --http URL --user NAME (not both)")
        return EXIT_USAGE
    try:
        if args.http is None:
            holder = credentials_login(args.credentials)
        else:
            password = os.environ.get(PASSWORD_VARIABLE) or getpass.getpass(f"{args.user}'s password: ")
            holder = credentials_login_over_http(args.http, args.user, password)
    except ValueError as error:
        console.print(f"kiln: {error}")
        return EXIT_USAGE
    console.print(f"logged in as {holder}: kiln commands now act as {holder} only")
    return 0


def _up(args: argparse.Namespace) -> int:
    from infra.platform import Platform

    try:
        settings = Settings.from_env()
    except SettingsError as error:
        console.print(f"kiln up: {error}")
        return EXIT_USAGE
    if args.nats_cluster:
        settings = dataclasses.replace(settings, nats_cluster=args.nats_cluster)
    platform = Platform.from_settings(settings)
    # SIGTERM stops Kiln the way Ctrl-C does, at any point, startup included. (SIGINT is
    # set too: a shell starting us in the background would have us ignore it.)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        console.print("starting Kiln …")
        asyncio.run(platform.start())
        fleet_control.Requests(platform.data_dir).announce()
        console.print(
            "Kiln is up.\n"
            f"{platform.describe()}\n"
            'Try: .venv/bin/kiln generate "a red circle" --user alice -o out.png\n'
            f"  or the playground: {platform.http_url}/\n"
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
        fleet_control.Requests(platform.data_dir).retire()
    return 0


def _supervise(platform) -> None:
    """Restart a service that exits on its own, and roll a service's processes when
    `kiln fleet restart` asks; runs until Ctrl-C."""
    rolls = fleet_control.Requests(platform.data_dir)
    signal.signal(signal.SIGHUP, lambda *_: rolls.asked.set())
    rolls.listen()
    while True:
        for name, process in list(platform.services.items()):
            if process.poll() is not None:
                log = platform.log_dir / f"{name}.log"
                console.print(f"{name} exited with {process.returncode}; restarting it (log: {log})")
                service, env = platform.started_as.get(name, (name, {}))
                platform.start_service(service, instance=name, env=env)
        if rolls.asked.is_set():
            rolls.asked.clear()
            rolls.serve(lambda service: asyncio.run(platform.roll(service)), console.print)
        time.sleep(1)


def _fleet_restart(args: argparse.Namespace) -> int:
    try:
        result = fleet_control.ask(Settings.from_env().data_dir, args.service, args.timeout)
    except fleet_control.ControlError as error:
        console.print(f"kiln fleet restart: {error}")
        return 1
    console.print(result)
    return 0 if result.startswith("restarted") else 1


if __name__ == "__main__":
    sys.exit(main())
