"""One request through quota, context, render and delivery on real servers."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from PIL import Image

from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects, telemetry
from shared.bus import ORIGINAL_SUBJECT_HEADER, REASON_HEADER
from shared.events import (
    ImageDelivered,
    PromptSubmitted,
    QuotaDenied,
    RenderProgress,
    RenderRequested,
    RequestFailed,
    encode,
)
from tests.conftest import replaced

pytestmark = pytest.mark.integration


async def _messages_on(client: KilnClient, stream: str, subject: str) -> int:
    info = await client.js.stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def _decisions(db: asyncpg.Connection, user: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT version, event_type, request_id, payload FROM quota_events WHERE stream_id = $1 ORDER BY version",
        f"user:{user}",
    )


async def _send_render_job(client: KilnClient, user: str, request_id: str | None = None, **fields: object) -> str:
    """Put a render job on the queue by hand, as context would, bypassing quota."""
    request_id = request_id or uuid.uuid4().hex
    job = RenderRequested(
        **(
            {
                "request_id": request_id,
                "user_id": user,
                "prompt": "x",
                "width": 32,
                "height": 32,
                "steps": 10,
                "seed": 1,
            }
            | fields
        )
    )
    await client.js.publish(subjects.render_job("free", user), encode(job))
    return request_id


async def test_one_prompt_gives_one_png(client: KilnClient, db: asyncpg.Connection, user: str):
    progress: list[RenderProgress] = []

    outcome = await client.generate("a red circle", user_id=user, steps=10, on_progress=progress.append)

    assert isinstance(outcome, ImageDelivered), outcome
    png = await client.download(outcome)
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel: a truncated or corrupt PNG raises here
    assert (image.format, image.size) == ("PNG", (32, 32))
    rendering = [event for event in progress if event.state == "rendering"]
    assert rendering and rendering[-1].step == rendering[-1].total_steps == 10
    assert [event.step for event in rendering] == sorted(event.step for event in rendering)
    assert progress.index(rendering[0]) == len(progress) - len(rendering)  # no queue report after
    rows = await _decisions(db, user)
    assert [(row["event_type"], row["request_id"]) for row in rows] == [("QuotaGranted", outcome.request_id)]


async def test_fourth_prompt_of_a_day_is_denied_with_reason_and_reset(
    client: KilnClient, db: asyncpg.Connection, user: str
):
    for _ in range(3):
        assert isinstance(await client.generate("a blue square", user_id=user), ImageDelivered)

    denied = await client.generate("a blue square", user_id=user)

    assert isinstance(denied, QuotaDenied), denied
    assert denied.reason == "daily_limit" and "3 images per UTC day" in denied.detail
    midnight = (denied.decided_at + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert denied.retry_at == midnight
    rows = await _decisions(db, user)
    assert [row["event_type"] for row in rows] == ["QuotaGranted"] * 3 + ["QuotaDenied"]
    assert [row["version"] for row in rows] == [1, 2, 3, 4]


async def test_same_request_id_twice_gives_one_decision_and_one_image(
    client: KilnClient, db: asyncpg.Connection, user: str
):
    request_id = uuid.uuid4().hex
    submission = PromptSubmitted(request_id=request_id, user_id=user, prompt="a green triangle")
    await client.submit(submission)
    await client.submit(submission)  # dropped by JetStream as a duplicate Nats-Msg-Id
    # Without a message id JetStream cannot tell; quota must recognise the request itself.
    await client.js.publish(subjects.prompt_submitted(user), encode(submission))

    outcome = await client.generate("a green triangle", user_id=user, request_id=request_id)
    assert isinstance(outcome, ImageDelivered), outcome
    # The render job again, as context would send it after the duplicate window has passed.
    await _send_render_job(client, user, request_id, prompt="a green triangle")
    await asyncio.sleep(1.5)  # let any second decision, render or delivery surface

    assert await _messages_on(client, "KILN_QUOTA", subjects.quota_decided(user, request_id)) == 1
    assert await _messages_on(client, "KILN_RENDER_EVENTS", subjects.render_event(user, request_id)) == 1
    assert await _messages_on(client, "KILN_OUTCOMES", subjects.outcome(user, request_id)) == 1
    rows = await _decisions(db, user)
    assert [(row["event_type"], json.loads(row["payload"])["used"]) for row in rows] == [("QuotaGranted", 1)]


async def test_one_trace_spans_the_client_and_all_four_services(client: KilnClient, db: asyncpg.Connection, user: str):
    tracer = telemetry.setup("kiln-tests", otlp_endpoint=None)
    with tracer.start_as_current_span("test") as root:
        outcome = await client.generate("a black circle", user_id=user)
    assert isinstance(outcome, ImageDelivered), outcome

    # Each recorded event carries the traceparent of the span that published it:
    # quota's decision, render's result (render continued context's job message) and
    # delivery's outcome must all belong to the client's trace.
    client_trace = format(root.get_span_context().trace_id, "032x")
    recorded = await db.fetchval("SELECT metadata FROM quota_events WHERE stream_id = $1", f"user:{user}")
    assert json.loads(recorded)["trace_id"] == client_trace  # the log row leads to the trace
    published_by = {
        "quota": ("KILN_QUOTA", subjects.quota_decided(user, outcome.request_id)),
        "render": ("KILN_RENDER_EVENTS", subjects.render_event(user, outcome.request_id)),
        "delivery": ("KILN_OUTCOMES", subjects.outcome(user, outcome.request_id)),
    }
    for service, (stream, subject) in published_by.items():
        message = await client.js.get_last_msg(stream, subject)
        version, trace_id, span_id, flags = (message.headers or {})["traceparent"].split("-")
        assert trace_id == client_trace, f"{service} published outside the client's trace"


async def test_a_render_that_cannot_succeed_ends_as_a_failed_request(client: KilnClient, user: str):
    # Quota and context would never let a 12-pixel image through; a hand-made job tests
    # the render worker's own refusal and delivery's RequestFailed.
    request_id = await _send_render_job(client, user, width=12, height=12)

    outcome = await client.wait_for_outcome(user, request_id, timeout_s=30)

    assert isinstance(outcome, RequestFailed), outcome
    assert (outcome.stage, outcome.reason) == ("render", "invalid")
    assert "divisible by 8" in outcome.detail


async def test_a_job_that_keeps_failing_is_retried_then_ends_as_a_failed_request(
    platform: Platform, client: KilnClient, user: str
):
    # A render that raises (a failpoint): not a rejection (ValueError) but an error that
    # might pass, so render retries it before giving up.
    with replaced(platform, "render", ("render-failing", {"KILN_FAILPOINT": "render.job:raise"})):
        request_id = await _send_render_job(client, user)
        outcome = await client.wait_for_outcome(user, request_id, timeout_s=60)

    assert isinstance(outcome, RequestFailed), outcome
    assert (outcome.stage, outcome.reason) == ("render", "gave_up")
    assert "failed 3 times" in outcome.detail and "InjectedFault" in outcome.detail
    data, headers = await _dead_letter_for(
        client, subjects.render_job("free", user), service="render", containing=request_id.encode()
    )
    assert b"InjectedFault" in headers[REASON_HEADER].encode() and request_id.encode() in data


async def test_a_request_that_has_ended_is_not_decided_again(client: KilnClient, db: asyncpg.Connection, user: str):
    # An earlier copy of the request was given up on; a later copy (a re-submission past
    # the duplicate window) must not open it again.
    request_id = uuid.uuid4().hex
    ended = RequestFailed(request_id=request_id, user_id=user, stage="quota", reason="gave_up", detail="outage")
    await client.js.publish(subjects.outcome(user, request_id), encode(ended))
    late_copy = PromptSubmitted(
        request_id=request_id,
        user_id=user,
        prompt="a red circle",
        submitted_at=datetime.now(UTC) - timedelta(minutes=10),  # sent again, much later
    )
    await client.js.publish(subjects.prompt_submitted(user), encode(late_copy))

    outcome = await client.generate("a red circle", user_id=user, request_id=request_id)
    await asyncio.sleep(1.0)  # give quota time to (wrongly) decide the late copy

    assert isinstance(outcome, RequestFailed) and outcome.reason == "gave_up"
    assert await _decisions(db, user) == []
    assert await _messages_on(client, "KILN_OUTCOMES", subjects.outcome(user, request_id)) == 1


async def test_two_users_may_use_the_same_request_id(client: KilnClient, db: asyncpg.Connection):
    request_id = f"shared-{uuid.uuid4().hex[:8]}"
    alice, bob = f"alice{uuid.uuid4().hex[:6]}", f"bob{uuid.uuid4().hex[:6]}"

    denied = await client.generate("", user_id=alice, request_id=request_id)  # invalid: empty
    delivered = await client.generate("a red square", user_id=bob, request_id=request_id)

    assert isinstance(denied, QuotaDenied) and denied.user_id == alice
    assert isinstance(delivered, ImageDelivered) and delivered.user_id == bob
    assert delivered.image_key == f"{bob}/{request_id}.png"
    assert f"/{bob}/" in (await client.link(bob, request_id)).url
    assert len(await client.download(delivered)) > 0
    assert [row["event_type"] for row in await _decisions(db, bob)] == ["QuotaGranted"]


async def _dead_letter_for(
    client: KilnClient, subject: str, service: str = "quota", timeout_s: float = 10, containing: bytes = b""
) -> tuple[bytes, dict]:
    """The newest dead letter of `service` from `subject` (whose payload holds `containing`)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        try:
            last = await client.js.get_last_msg("KILN_DEAD_LETTERS", subjects.dead_letter(service))
            if (last.headers or {}).get(ORIGINAL_SUBJECT_HEADER) == subject and containing in (last.data or b""):
                return last.data or b"", last.headers or {}
        except Exception:  # noqa: BLE001 - nothing dead-lettered yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing from {subject} reached the dead-letter subject in {timeout_s}s")


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"\xff\x00 not an event", "undecodable"),
        (b'{"type":"PromptSubmitted","request_id":"r","user_id":"u"}', "undecodable"),  # no prompt
        (
            b'{"type":"RenderProgress","request_id":"r","user_id":"SUBJECT_USER","step":1,"total_steps":2}',
            "expected PromptSubmitted",
        ),
        (
            b'{"type":"PromptSubmitted","request_id":"r","user_id":"someone-else","prompt":"p"}',
            "does not match the subject",
        ),
    ],
)
async def test_bad_messages_are_dead_lettered_and_the_services_keep_serving(
    client: KilnClient, user: str, payload: bytes, reason: str
):
    subject = subjects.prompt_submitted(user)
    payload = payload.replace(b"SUBJECT_USER", user.encode())

    await client.js.publish(subject, payload)

    data, headers = await _dead_letter_for(client, subject)
    assert data == payload
    assert reason in headers[REASON_HEADER]
    assert isinstance(await client.generate("a yellow circle", user_id=user), ImageDelivered)


async def test_a_prompt_sent_while_quota_is_down_is_decided_when_it_returns(
    platform: Platform, client: KilnClient, user: str
):
    platform.stop_service("quota")
    try:
        pending = asyncio.create_task(client.generate("a white square", user_id=user, timeout_s=90))
        await asyncio.sleep(1.0)
        assert not pending.done()  # nobody decides while quota is down; the prompt waits in JetStream
    finally:
        platform.start_service("quota")

    assert isinstance(await pending, ImageDelivered)


async def test_a_prompt_sent_while_postgres_is_down_is_decided_when_it_returns(
    platform: Platform, client: KilnClient, db: asyncpg.Connection, user: str
):
    if platform.embedded_postgres is None:
        pytest.skip("stops the database: only the embedded one is ours to stop")
    await db.close()
    platform.embedded_postgres.stop()
    try:
        pending = asyncio.create_task(client.generate("a orange circle", user_id=user, timeout_s=90))
        await asyncio.sleep(3.0)
        assert not pending.done()  # quota cannot record a decision, so it makes none
    finally:
        platform.embedded_postgres.start()

    assert isinstance(await pending, ImageDelivered)


async def test_delivery_answers_unknown_images_with_404_and_reports_health(platform: Platform):
    async with httpx.AsyncClient(base_url=platform.http_url) as http:
        unknown = f"/images/alice/{uuid.uuid4().hex}.png"
        assert (await http.get(unknown)).status_code == 403  # whose it is comes first
        http.headers["Origin"] = platform.http_url  # as the playground's page would send it
        account = {"user": "alice", "password": "correct horse battery"}
        signed_in = await http.post("/api/signup", json=account)
        if signed_in.status_code == 409:  # made by an earlier test
            signed_in = await http.post("/api/login", json=account)
        assert signed_in.status_code in (200, 201), signed_in.text
        assert (await http.get(unknown)).status_code == 404
        assert (await http.get("/images/alice/not%20an%20id.png")).status_code == 400
        assert (await http.get("/images/not.a.user/abc.png")).status_code == 400
        health = await http.get("/healthz")
    assert health.status_code == 200 and health.json() == {"nats": "connected"}


async def _kiln(platform: Platform, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kiln.cli",
        *args,
        env={**platform.service_env()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return process.returncode or 0, (out + err).decode()


async def test_cli_writes_the_png_then_explains_the_denial(platform: Platform, user: str, tmp_path):
    # One request written twice (the same id: one image): as the model drew it, and as a
    # person looks at it, each of its pixels an 8×8 square.
    request_id = uuid.uuid4().hex
    native, viewable = tmp_path / "native.png", tmp_path / "viewable.png"
    for target, extra in ((native, ["--native"]), (viewable, [])):
        code, output = await _kiln(
            platform,
            "generate",
            "a purple circle",
            "--user",
            user,
            "--request-id",
            request_id,
            "-o",
            str(target),
            *extra,
        )
        assert code == 0, output
    assert Image.open(native).size == (32, 32)
    assert Image.open(viewable).size == (256, 256) and f"wrote {viewable} (256×256, " in output
    upscaled = Image.open(native).convert("RGB").resize((256, 256), Image.Resampling.NEAREST)
    assert Image.open(viewable).convert("RGB").tobytes() == upscaled.tobytes()

    for _ in range(2):  # the day's other two images
        code, output = await _kiln(platform, "generate", "a purple circle", "--user", user)
        assert code == 0, output

    code, output = await _kiln(platform, "generate", "a purple circle", "--user", user)

    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("denied: daily_limit:"), output
    assert lines[1].startswith("trace: "), output  # where to look
    assert "try again after" in lines[0]


async def test_cli_rejects_a_user_id_that_cannot_be_a_subject(platform: Platform):
    code, output = await _kiln(platform, "generate", "a red circle", "--user", "not.a.token")
    assert code == 64 and "`user_id`" in output


async def test_a_request_past_kilns_limits_is_denied_before_it_is_charged(client: KilnClient, user: str):
    """Quota, context and render hold one set of limits: a job too big is refused up front,
    not charged and then failed."""
    for fields, named in (({"width": 1024, "height": 1024}, "`width`"), ({"steps": 80}, "`steps`")):
        outcome = await client.generate("a red circle", user_id=user, **fields)
        assert isinstance(outcome, QuotaDenied) and outcome.reason == "invalid" and named in outcome.detail, outcome
    assert (await client.quota(user)).used == 0
