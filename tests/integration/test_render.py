"""Render on the real stack: compatible jobs batched, paid work first and users in turn, a
worker that dies mid-batch, a worker that drains on SIGTERM, cancels, the thermal guard,
and edits of earlier images."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime

import msgspec
import nats.js.errors
import numpy as np
import pytest
from PIL import Image

from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.events import (
    ImageDelivered,
    PromptSubmitted,
    RenderCompleted,
    RenderFailed,
    RenderProgress,
    RenderRequested,
    RequestFailed,
    WorkerHeartbeat,
    decode,
    encode,
    utcnow,
)
from shared.failpoints import EXIT_CODE
from tests.conftest import replaced

pytestmark = pytest.mark.integration

RenderOutcome = RenderCompleted | RenderFailed


def _user(name: str) -> str:
    return f"{name}{uuid.uuid4().hex[:8]}"


async def _queue_job(client: KilnClient, user: str, tier: str = "free", **fields: object) -> RenderRequested:
    """A render job put on the queue by hand, as context would after a grant."""
    job = RenderRequested(
        **(
            {
                "request_id": uuid.uuid4().hex[:16],
                "user_id": user,
                "prompt": "a red circle on blue",
                "width": 32,
                "height": 32,
                "steps": 10,
                "seed": 1,
                "tier": tier,
            }
            | fields
        )
    )
    await client.js.publish(subjects.render_job(tier, user), encode(job))
    return job


async def _render_outcome(client: KilnClient, job: RenderRequested, timeout_s: float = 60) -> RenderOutcome:
    subject = subjects.render_event(job.user_id, job.request_id)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return decode((await client.js.get_last_msg(subjects.RENDER_EVENTS.name, subject)).data)
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no render outcome for {job.request_id}") from None
            await asyncio.sleep(0.1)


async def _messages_on(client: KilnClient, stream: str, subject: str) -> int:
    info = await client.js.stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def _exactly_one_image(client: KilnClient, job: RenderRequested) -> None:
    """One render outcome, one request outcome, one stored PNG for the request."""
    user, request = job.user_id, job.request_id
    assert await _messages_on(client, subjects.RENDER_EVENTS.name, subjects.render_event(user, request)) == 1
    outcome = await client.wait_for_outcome(user, request, timeout_s=30)
    assert isinstance(outcome, ImageDelivered), outcome
    assert await _messages_on(client, subjects.OUTCOMES.name, subjects.outcome(user, request)) == 1
    Image.open(io.BytesIO(await client.download(outcome))).load()


@contextlib.contextmanager
def _worker(platform: Platform, name: str, **env: str) -> Iterator[None]:
    """An extra render worker for the block (the usual one is stopped by `replaced`)."""
    platform.start_service("render", instance=name, env={"KILN_RENDER_MAX_WAIT_MS": "0"} | env)
    try:
        yield
    finally:
        platform.stop_service(name)


# -- batching and order ------------------------------------------------------------------


async def test_waiting_compatible_jobs_render_as_one_batch(platform: Platform, client: KilnClient):
    with replaced(platform, "render"):
        same = [await _queue_job(client, _user("b"), prompt=f"a {c} square") for c in ("red", "green", "blue")]
        bigger = await _queue_job(client, _user("b"), width=40, height=40)
        with _worker(platform, "render-batching", KILN_RENDER_MAX_BATCH="8", KILN_RENDER_MAX_WAIT_MS="1500"):
            outcomes = [await _render_outcome(client, job) for job in [*same, bigger]]

    assert all(isinstance(o, RenderCompleted) for o in outcomes), outcomes
    # The three 32×32 jobs in one pipeline call; the 40×40 one cannot join them.
    assert [o.batch_size for o in outcomes] == [3, 3, 3, 1]
    assert len({o.render_ms for o in outcomes[:3]}) == 1
    for job in [*same, bigger]:
        await _exactly_one_image(client, job)


async def test_an_idle_worker_starts_a_lone_job_at_once_instead_of_waiting_for_company(
    platform: Platform, client: KilnClient
):
    heartbeats = await client.nc.subscribe(subjects.fleet_telemetry("*"))
    with replaced(platform, "render"):
        with _worker(platform, "render-idle", KILN_RENDER_MAX_WAIT_MS="3000"):
            await _heartbeat_from(heartbeats, platform.services["render-idle"].pid, after=utcnow())  # up
            job = await _queue_job(client, _user("idle"))
            outcome = await _render_outcome(client, job)
    await heartbeats.unsubscribe()
    # Nothing else queued or arriving: its batch starts now, not after the 3 s fill window.
    assert isinstance(outcome, RenderCompleted) and outcome.queued_ms is not None
    assert outcome.queued_ms < 1000, outcome.queued_ms


async def test_paid_jobs_go_first_and_free_users_take_turns(platform: Platform, client: KilnClient):
    heavy, light, paying = _user("heavy"), _user("light"), _user("paying")
    with replaced(platform, "render"):
        # Queued in this order: a free user's six jobs, another free user's one, then two
        # paid jobs. A first-in-first-out queue would render the light user's job 7th.
        heavy_jobs = [await _queue_job(client, heavy, seed=n) for n in range(6)]
        light_job = await _queue_job(client, light)
        paid_jobs = [await _queue_job(client, paying, tier="paid", seed=n) for n in range(2)]
        with _worker(platform, "render-one-at-a-time", KILN_RENDER_MAX_BATCH="1"):
            outcomes = {
                job.request_id: await _render_outcome(client, job) for job in [*heavy_jobs, light_job, *paid_jobs]
            }

    order = sorted(outcomes.values(), key=lambda o: o.completed_at)
    served = [o.user_id for o in order]
    assert served[:2] == [paying, paying], served
    assert light in served[2:4], served  # the next round of free users, not after all of heavy's
    assert served.count(heavy) == 6


async def test_a_batch_out_of_memory_is_rendered_in_halves_before_any_job_fails(platform: Platform, client: KilnClient):
    with replaced(platform, "render"):
        jobs = [
            await _queue_job(client, _user("oom"), prompt=f"a {c} square") for c in ("red", "green", "blue", "pink")
        ]
        # A device that fits two jobs at once: the batch of four runs out of memory.
        with _worker(
            platform,
            "render-small-device",
            KILN_RENDER_MAX_BATCH="4",
            KILN_RENDER_MAX_WAIT_MS="1500",
            KILN_FAILPOINT="render.batch:oom",
        ):
            outcomes = [await _render_outcome(client, job) for job in jobs]

    assert all(isinstance(o, RenderCompleted) for o in outcomes), outcomes
    assert [o.batch_size for o in outcomes] == [2, 2, 2, 2]
    assert "a batch of 4 ran out of memory" in (platform.log_dir / "render-small-device.log").read_text()
    for job in jobs:
        await _exactly_one_image(client, job)


# -- nothing lost ------------------------------------------------------------------------


async def test_a_worker_that_dies_mid_batch_has_its_jobs_rendered_by_another(platform: Platform, client: KilnClient):
    fast_redelivery = {"KILN_RENDER_ACK_WAIT_S": "2", "KILN_RENDER_MAX_BATCH": "4", "KILN_RENDER_MAX_WAIT_MS": "1000"}
    with replaced(platform, "render"):
        jobs = [await _queue_job(client, _user("d")) for _ in range(3)]
        platform.start_service(
            "render", instance="render-doomed", env=fast_redelivery | {"KILN_FAILPOINT": "render.job"}
        )
        doomed = platform.services["render-doomed"]
        assert await asyncio.to_thread(doomed.wait, 60) == EXIT_CODE  # died holding the batch
        platform.stop_service("render-doomed")
        with _worker(platform, "render-survivor", **fast_redelivery):
            outcomes = [await _render_outcome(client, job) for job in jobs]

    assert all(isinstance(o, RenderCompleted) for o in outcomes), outcomes
    for job in jobs:
        await _exactly_one_image(client, job)


async def test_sigterm_finishes_the_batch_in_hand_and_hands_back_the_rest(platform: Platform, client: KilnClient):
    # A lone worker, so also the fleet's dispatcher: it renders a slow 90-step job and holds
    # a 20-step one that cannot share its batch when SIGTERM comes.
    prefix = uuid.uuid4().hex[:6]
    with replaced(platform, "render"):
        first = await _queue_job(client, f"a{prefix}", steps=90)
        held = await _queue_job(client, f"b{prefix}", steps=20)
        sub = await client.nc.subscribe(subjects.render_progress(first.user_id, first.request_id))
        platform.start_service("render", instance="render-draining", env={"KILN_RENDER_MAX_BATCH": "2"})
        await _rendering(sub)  # the first batch is rendering
        await sub.unsubscribe()
        exit_code = await asyncio.to_thread(platform.stop_service, "render-draining", signal.SIGTERM, 60)
        assert exit_code == 0
        finished = await _render_outcome(client, first, timeout_s=1)  # done before it exited
        assert isinstance(finished, RenderCompleted)
        with _worker(platform, "render-next"):
            handed_back = await _render_outcome(client, held, timeout_s=30)

    assert isinstance(handed_back, RenderCompleted) and handed_back.worker_id != finished.worker_id
    log = (platform.log_dir / "render-draining.log").read_text()
    assert "handed back 1 jobs" in log
    for job in (first, held):
        await _exactly_one_image(client, job)


async def _rendering(progress) -> RenderProgress:
    """The first progress event of a job that is rendering (not one telling its place in
    the queue)."""
    while True:
        event: RenderProgress = decode((await progress.next_msg(timeout=60)).data)
        if event.state == "rendering":
            return event


# -- cancels -----------------------------------------------------------------------------


async def test_a_cancelled_job_is_dropped_before_rendering_and_refunded(
    platform: Platform, client: KilnClient, db, user: str
):
    with replaced(platform, "render"):
        prompt = PromptSubmitted(request_id=uuid.uuid4().hex[:16], user_id=user, prompt="a red circle")
        await client.submit(prompt)
        await _wait_until_queued(client, user)
        await client.cancel(user, prompt.request_id)
    # The usual worker is back and finds the job cancelled.
    outcome = await client.wait_for_outcome(user, prompt.request_id, timeout_s=60)
    assert isinstance(outcome, RequestFailed) and (outcome.stage, outcome.reason) == ("render", "cancelled")
    assert not await _image_stored(client, user, prompt.request_id)
    deadline = time.monotonic() + 20
    while not await db.fetchval(
        "SELECT count(*) FROM quota_events WHERE stream_id = $1 AND event_type = 'QuotaRefunded'", f"user:{user}"
    ):
        assert time.monotonic() < deadline, "no refund for the cancelled request"
        await asyncio.sleep(0.2)


async def test_a_job_cancelled_while_rendering_stops_between_steps(platform: Platform, client: KilnClient):
    job = await _queue_job(client, _user("c"), steps=400)
    sub = await client.nc.subscribe(subjects.render_progress(job.user_id, job.request_id))
    first = await _rendering(sub)
    await client.cancel(job.user_id, job.request_id)
    outcome = await _render_outcome(client, job)
    await sub.unsubscribe()

    assert isinstance(outcome, RenderFailed) and outcome.reason == "cancelled", outcome
    # Stopped between two steps, well before the last one.
    assert first.total_steps == 400 and outcome.detail.startswith("cancelled at step ")
    assert int(outcome.detail.split()[3]) < 400
    assert not await _image_stored(client, job.user_id, job.request_id)


# -- heat --------------------------------------------------------------------------------


async def test_a_hot_gpu_pauses_intake_until_it_cools_and_takes_half_batches_while_warm(
    platform: Platform, client: KilnClient, tmp_path
):
    reading = tmp_path / "gpu-temperature"
    reading.write_text("91")
    worker_env = {"KILN_INJECT_GPU_TEMPERATURE": str(reading), "KILN_RENDER_MAX_BATCH": "8"}
    heartbeats = await client.nc.subscribe(subjects.fleet_telemetry("*"))
    with replaced(platform, "render", ("render-hot", worker_env)):
        user = _user("t")
        request_id = uuid.uuid4().hex[:16]
        progress = await client.nc.subscribe(subjects.render_progress(user, request_id))
        job = await _queue_job(client, user, request_id=request_id)
        pid = platform.services["render-hot"].pid
        beat = await _heartbeat_from(heartbeats, pid, after=utcnow())
        assert (beat.gpu_temperature_c, beat.batch_limit) == (91.0, 0)
        # While it waits, its owner hears where it stands.
        queued: RenderProgress = decode((await progress.next_msg(timeout=10)).data)
        assert (queued.state, queued.queue_position, queued.step) == ("queued", 1, 0)
        await progress.unsubscribe()
        await asyncio.sleep(2)
        with pytest.raises(TimeoutError):
            await _render_outcome(client, job, timeout_s=0.5)  # paused: not taken
        reading.write_text("82")  # under the pause line but not yet under resume (75): still paused
        assert (await _heartbeat_from(heartbeats, pid, after=utcnow())).batch_limit == 0
        reading.write_text("70")  # cool: back to work
        assert isinstance(await _render_outcome(client, job, timeout_s=30), RenderCompleted)
        reading.write_text("83")  # warm: half batches
        assert (await _heartbeat_from(heartbeats, pid, after=utcnow())).batch_limit == 4
    await heartbeats.unsubscribe()


async def _heartbeat_from(heartbeats, pid: int, after: datetime) -> WorkerHeartbeat:
    """The first heartbeat sent `after` by the worker with this pid (ids end in it)."""
    while True:
        # (A worker just started loads its model and warms up first: allow for a busy host.)
        beat = msgspec.json.decode((await heartbeats.next_msg(timeout=60)).data, type=WorkerHeartbeat)
        if beat.worker_id.endswith(f"-{pid}") and beat.at > after:
            return beat


# -- edits -------------------------------------------------------------------------------


async def test_an_edit_starts_from_the_earlier_image_and_inpainting_keeps_the_unmasked_part(
    client: KilnClient, user: str
):
    original = await client.generate("a red circle on a blue background", user_id=user, steps=20)
    assert isinstance(original, ImageDelivered), original
    source = _pixels(await client.download(original))

    edited = await client.generate(
        "a green circle on a blue background", user_id=user, steps=20, edit_of=original.request_id, strength=0.8
    )
    assert isinstance(edited, ImageDelivered), edited
    assert np.abs(_pixels(await client.download(edited)) - source).max() > 40  # it changed

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half only
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    mask_key = await client.upload_mask(user, buffer.getvalue())
    inpainted = await client.generate(
        "a yellow square on a blue background", user_id=user, steps=20, edit_of=original.request_id, mask_key=mask_key
    )
    assert isinstance(inpainted, ImageDelivered), inpainted
    result = _pixels(await client.download(inpainted))
    assert np.abs(result[:, 20:] - source[:, 20:]).mean() < 12  # the unmasked right side is kept


async def test_an_edit_of_an_image_that_is_not_the_users_is_refused(client: KilnClient, user: str):
    someone_else = _user("other")
    theirs = await client.generate("a red circle", user_id=someone_else)
    assert isinstance(theirs, ImageDelivered)
    # The source key is built from the editing user's own id: another user's request id
    # names nothing of theirs.
    outcome = await client.generate("a blue circle", user_id=user, edit_of=theirs.request_id)
    assert isinstance(outcome, RequestFailed) and (outcome.stage, outcome.reason) == ("context", "no_such_image")
    assert theirs.request_id in outcome.detail


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)


async def _image_stored(client: KilnClient, user: str, request_id: str) -> bool:
    store = await client.js.object_store(subjects.IMAGE_BUCKET)
    try:
        await store.get_info(subjects.image_key(user, request_id))
    except nats.js.errors.ObjectNotFoundError:
        return False
    return True


async def _wait_until_queued(client: KilnClient, user: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    subject = subjects.render_job("free", user)
    while not await _messages_on(client, subjects.RENDER_JOBS.name, subject):
        assert time.monotonic() < deadline, "the job never reached the render queue"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    "fields",
    [
        {"steps": 5000},
        {"width": 4096, "height": 4096},
    ],
    ids=["steps", "size"],
)
async def test_render_checks_each_job_again_whoever_sent_it(client: KilnClient, user: str, fields: dict):
    """A job over the limits, or editing another user's image, from a compromised service
    (or anyone who can publish jobs) fails as invalid without holding the worker."""
    job = await _queue_job(client, user, **fields)
    outcome = await _render_outcome(client, job)
    assert isinstance(outcome, RenderFailed) and outcome.reason == "invalid", outcome
    assert not await _image_stored(client, user, job.request_id)


async def test_render_will_not_edit_another_users_image(client: KilnClient, user: str):
    other = f"o{uuid.uuid4().hex[:10]}"
    theirs = await client.generate("a blue square", user_id=other)
    assert isinstance(theirs, ImageDelivered)
    job = await _queue_job(client, user, mode="edit", source_key=subjects.image_key(other, theirs.request_id))
    outcome = await _render_outcome(client, job)
    assert isinstance(outcome, RenderFailed) and outcome.reason == "invalid" and "not" in outcome.detail, outcome


def test_the_render_log_holds_no_library_warnings(platform: Platform):
    """What an operator reads is Kiln's own: no import-time or load-time warnings of the
    model libraries (each would repeat at every worker start)."""
    log = (platform.log_dir / "render.log").read_text(errors="replace")
    noise = [line for line in log.splitlines() if re.search(r"Warning\b|warnings\.warn|pip install", line)]
    assert noise == [], noise[:5]
