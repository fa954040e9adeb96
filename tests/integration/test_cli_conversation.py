"""`kiln chat`, `kiln edit`, `kiln cancel` and `kiln quota` as a user runs them, against the
real stack; and what Ctrl-C and a timeout leave the user to go on with."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.settings import PROJECT_ROOT
from tests.conftest import replaced

pytestmark = pytest.mark.integration
KILN = [sys.executable, "-m", "kiln"]


def _env(platform: Platform) -> dict[str, str]:
    # The platform's data folder holds Kiln's keys: the CLI mints the user's credential.
    return os.environ | {"KILN_NATS_URL": platform.nats_url, "KILN_DATA_DIR": str(platform.data_dir), "COLUMNS": "200"}


async def _kiln(platform: Platform, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return await _run(platform, [*KILN, *args], stdin=stdin)


async def _run(platform: Platform, command: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    """A command line as a user would type it (one the CLI printed, say)."""
    return await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=PROJECT_ROOT,
        env=_env(platform),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def _start(platform: Platform, command: list[str], stdin: int | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *command,
        cwd=PROJECT_ROOT,
        env=_env(platform),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def _printed_command(output: str, label: str) -> list[str]:
    """The command the CLI printed after `label`, as argv."""
    found = re.search(rf"{label}:? +(.+)$", output, re.MULTILINE)
    assert found, f"no {label!r} in: {output}"
    return shlex.split(found.group(1))


async def test_chat_draws_then_edits_in_words_and_shows_the_quota(platform: Platform, user: str, tmp_path: Path):
    script = "/style pixel-art\na red circle on a white background\nmake it green\n/quota\n/quit\n"
    result = await _kiln(platform, "chat", "--user", user, "--save", str(tmp_path), stdin=script)
    assert result.returncode == 0, result.stderr
    drawn = re.findall(r"drawn as: (.*)", result.stderr)
    assert drawn == [
        "a red circle on a white background, pixel art, 8-bit, crisp edges",
        "a green circle on a white background, pixel art, 8-bit, crisp edges",
    ], result.stderr
    assert f"{user} (free plan): 2 of 3 images used today, 1 left" in result.stdout
    assert len(list(tmp_path.glob("*.png"))) == 2


async def test_edit_by_id_and_quota_from_the_command_line(platform: Platform, user: str, tmp_path: Path):
    first = await _kiln(platform, "generate", "a yellow square at the top", "--user", user)
    assert first.returncode == 0, first.stderr
    image_id = re.search(r"image (\w+) drawn as", first.stderr).group(1)
    out = tmp_path / "purple.png"
    edited = await _kiln(platform, "edit", image_id, "make it purple", "--user", user, "-o", str(out))
    assert edited.returncode == 0, edited.stderr
    assert "drawn as: a purple square at the top" in edited.stderr
    assert out.read_bytes().startswith(b"\x89PNG")

    missing = await _kiln(platform, "edit", "no-such-request", "make it blue", "--user", user)
    assert missing.returncode == 3 and f"{user} has no image from request no-such-request" in missing.stderr

    quota = await _kiln(platform, "quota", "--user", user)
    assert quota.returncode == 0 and "2 of 3 images used today, 1 left" in quota.stdout


async def test_chat_refuses_a_name_it_cannot_use_and_says_what_a_stopped_service_means(platform: Platform, user: str):
    bad = await _kiln(platform, "chat", "--user", "al ice", stdin="a red circle\n")
    assert bad.returncode == 64 and "--user must be 1-64 letters" in bad.stderr
    platform.stop_service("context")
    try:
        result = await _kiln(platform, "chat", "--user", user, stdin="/styles\n/quit\n")
    finally:
        platform.start_service("context")
        await platform.wait_ready()
    # The chat goes on after the failed question, and ends when asked to.
    assert result.returncode == 0 and "kiln: context is not running" in result.stderr


@pytest.mark.parametrize("word", ["quit", "exit", "/quit"])
async def test_chat_ends_on_a_bare_quit_without_drawing_it(platform: Platform, user: str, word: str):
    result = await _kiln(platform, "chat", "--user", user, stdin=f"{word}\na red circle\n")

    assert result.returncode == 0, result.stderr
    assert "drawn as" not in result.stderr and "denied" not in result.stderr
    quota = await _kiln(platform, "quota", "--user", user)
    assert "0 of 3 images used today" in quota.stdout, quota.stdout


async def test_timeout_and_ctrl_c_say_how_to_go_on_and_cancel_stops_the_request(
    platform: Platform, client: KilnClient, user: str
):
    with replaced(platform, "render"):  # no render worker: requests wait in the queue
        # 1. A timeout: the command to keep waiting, and the trace, as a delivered request has.
        timed_out = await _kiln(platform, "generate", "a red circle", "--user", user, "--timeout", "4")
        assert timed_out.returncode == 4, timed_out.stderr
        first_trace = _trace_id(timed_out.stderr)
        wait_for_first = _printed_command(timed_out.stderr, "To keep waiting")
        # Waiting again, and timing out again, links the request's own trace, not the re-run's.
        again = await _run(platform, wait_for_first)
        assert again.returncode == 4 and _trace_id(again.stderr) == first_trace, again.stderr

        # 2. Ctrl-C while the request waits: its id, that it goes on and is charged, and the
        #    exact commands to cancel it or to keep waiting.
        process = await _start(platform, [*KILN, "generate", "a blue square", "--user", user])
        await _wait_until_queued(client, user, jobs=2)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        interrupted = err.decode()
        assert process.returncode == 130, interrupted
        request_id = re.search(r"interrupted: request (\w+) goes on, and is charged unless you cancel it", interrupted)
        assert request_id, interrupted
        cancel = _printed_command(interrupted, "to cancel it")
        wait_for_second = _printed_command(interrupted, "to keep waiting")
        assert cancel == [*KILN, "cancel", request_id[1], "--user", user]
        assert wait_for_second == [*KILN, "generate", "a blue square", "--user", user, "--request-id", request_id[1]]

        # 3. The printed cancel, sent while the job still waits for a worker.
        cancelling = await _start(platform, [*cancel, "--timeout", "90"])
        await _wait_until_cancel_recorded(client, user, request_id[1])
    # The worker is back: it drops the cancelled job and renders the other.
    _, err = await asyncio.wait_for(cancelling.communicate(), 120)
    assert cancelling.returncode == 0, err.decode()
    assert f"cancelled request {request_id[1]}" in err.decode()

    # 4. The printed commands to keep waiting pick up each request where it is.
    second = await _run(platform, wait_for_second)
    assert second.returncode == 3 and "failed at render: cancelled" in second.stderr, second.stderr
    first = await _run(platform, wait_for_first)
    assert first.returncode == 0 and "drawn as: a red circle" in first.stderr, first.stderr
    assert _trace_id(first.stderr) == first_trace, "the re-run links a trace without the render"

    # 5. A request that has ended is past cancelling, and the CLI says how it ended.
    first_id = wait_for_first[wait_for_first.index("--request-id") + 1]
    late = await _kiln(platform, "cancel", first_id, "--user", user)
    assert late.returncode == 3, late.stderr
    assert f"request {first_id} had already ended, delivered: " in late.stderr
    bad = await _kiln(platform, "cancel", "not.an.id", "--user", user)
    assert bad.returncode == 64 and "REQUEST_ID must be 1-64 letters" in bad.stderr
    # The cancelled request was refunded: one image used, the delivered one.
    quota = await _kiln(platform, "quota", "--user", user)
    assert "1 of 3 images used today" in quota.stdout, quota.stdout


async def test_ctrl_c_in_chat_names_the_request_in_flight_and_how_to_cancel_or_keep_waiting(
    platform: Platform, client: KilnClient, user: str
):
    with replaced(platform, "render"):  # no render worker: the turn waits in the queue
        chat = await _start(platform, [*KILN, "chat", "--user", user], stdin=asyncio.subprocess.PIPE)
        chat.stdin.write(b"a red circle\n")
        await chat.stdin.drain()
        await _wait_until_queued(client, user, jobs=1)
        chat.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(chat.communicate(), 30)
        interrupted = err.decode()
        assert chat.returncode == 130, interrupted
        conversation = re.search(r"^conversation (c-\w+)\.", interrupted, re.MULTILINE)[1]
        request_id = re.search(r"interrupted: request (\w+) goes on, and is charged unless you cancel it", interrupted)
        assert request_id, interrupted
        cancel = _printed_command(interrupted, "to cancel it")
        keep_waiting = _printed_command(interrupted, "to keep waiting")
        assert cancel == [*KILN, "cancel", request_id[1], "--user", user]
        assert keep_waiting == [
            *KILN, "generate", "a red circle", "--user", user, "--conversation", conversation,
            "--request-id", request_id[1],
        ]  # fmt: skip

        # The printed commands do what they say: the cancel, sent while the turn waits…
        cancelling = await _start(platform, [*cancel, "--timeout", "90"])
        await _wait_until_cancel_recorded(client, user, request_id[1])
    _, err = await asyncio.wait_for(cancelling.communicate(), 120)
    assert cancelling.returncode == 0 and f"cancelled request {request_id[1]}" in err.decode(), err.decode()
    # … and the wait picks the same request up: cancelled, not drawn, not charged.
    waited = await _run(platform, keep_waiting)
    assert waited.returncode == 3 and "failed at render: cancelled" in waited.stderr, waited.stderr
    quota = await _kiln(platform, "quota", "--user", user)
    assert "0 of 3 images used today" in quota.stdout, quota.stdout


def _trace_id(output: str) -> str:
    """The trace id in the `trace:` line the CLI printed (a tracing UI's link, or the id)."""
    found = re.search(r"^trace: \S*?([0-9a-f]{32})$", output, re.MULTILINE)
    assert found, f"no trace in: {output}"
    return found[1]


async def _wait_until_queued(client: KilnClient, user: str, jobs: int, timeout_s: float = 60) -> None:
    subject = subjects.render_job("free", user)
    deadline = time.monotonic() + timeout_s
    while await _messages_on(client, subjects.RENDER_JOBS.name, subject) < jobs:
        assert time.monotonic() < deadline, f"{jobs} jobs of {user} never reached the render queue"
        await asyncio.sleep(0.1)


async def _wait_until_cancel_recorded(client: KilnClient, user: str, request_id: str, timeout_s: float = 60) -> None:
    subject = subjects.render_cancel(user, request_id)
    deadline = time.monotonic() + timeout_s
    while not await _messages_on(client, subjects.RENDER_CANCELS.name, subject):
        assert time.monotonic() < deadline, f"no cancel of {request_id} was recorded"
        await asyncio.sleep(0.1)


async def _messages_on(client: KilnClient, stream: str, subject: str) -> int:
    info = await client.js.stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)
