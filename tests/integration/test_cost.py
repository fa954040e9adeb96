"""A request's cost is known at admission (priced from the workers' measured speed): over
its plan's budget it is refused up front with what would fit; a render that runs far past
its budget is stopped and refunded; a waiting job's estimate adds up what is ahead of it.
Sizes other than the model's native ones are refused before anyone is charged."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import asyncpg
import msgspec
import pytest

from infra.platform import Platform
from services.quota.log import user_stream
from shared import cost, subjects
from shared.events import (
    ImageDelivered,
    QuotaDenied,
    RenderProgress,
    RequestFailed,
    WorkerHeartbeat,
    decode,
    utcnow,
)
from tests.conftest import TestClient, replaced
from tests.integration.test_quota import _kiln
from tests.integration.test_render import _heartbeat_from, _queue_job, _render_outcome

pytestmark = pytest.mark.integration


def _on_plan(platform: Platform, user: str, plan: str) -> None:
    assert _kiln("accounts", "add", user, plan, database_url=platform.database_url).returncode == 0


async def test_every_worker_reports_its_measured_speed_from_its_first_heartbeat(client: TestClient):
    heartbeats = await client.nc.subscribe(subjects.fleet_telemetry("*"))
    beat = msgspec.json.decode((await heartbeats.next_msg(timeout=10)).data, type=WorkerHeartbeat)
    await heartbeats.unsubscribe()
    # The warm-up render measured the model's native size before the worker took a job.
    assert beat.step_seconds.get("32x32", 0) > 0, beat


async def test_a_request_over_its_plans_budget_is_refused_up_front_with_what_fits(
    platform: Platform, client: TestClient, user: str, db: asyncpg.Connection
):
    _on_plan(platform, user, "tiny")  # 0.5 s an image: less than 50 steps at 32×32
    outcome = await client.generate("a red circle", user_id=user, steps=50)
    assert isinstance(outcome, QuotaDenied) and outcome.reason == "too_costly", outcome
    assert re.match(r"32×32×50 needs about [\d.]+ s here; the tiny plan allows 0\.5 s an image", outcome.detail)
    fitting = re.search(r"try --steps (\d+)$", outcome.detail)
    assert fitting and 1 <= int(fitting.group(1)) < 50, outcome.detail
    assert (await client.quota(user)).used == 0  # refused before it was charged
    # The price it was refused at is in the log, for `kiln audit replay`.
    meta = await db.fetchval(
        "SELECT metadata FROM quota_events WHERE stream_id = $1 AND request_id = $2",
        user_stream(user),
        outcome.request_id,
    )
    assert json.loads(meta)["inputs"]["pricing"]["step_seconds"]["32x32"] > 0
    # What fits is granted, priced within the budget.
    small = await client.generate("a red circle", user_id=user, steps=1)
    assert isinstance(small, ImageDelivered), small


async def test_a_size_the_model_was_not_trained_for_is_refused_before_it_is_charged(client: TestClient, user: str):
    outcome = await client.generate("a red circle", user_id=user, width=64, height=64)
    assert isinstance(outcome, QuotaDenied) and outcome.reason == "invalid", outcome
    assert outcome.detail == "the model draws 32×32 only, not 64×64"
    assert (await client.quota(user)).used == 0


async def test_a_render_far_past_its_budget_is_stopped_and_refunded(platform: Platform, client: TestClient, user: str):
    _on_plan(platform, user, "snug")  # 2 s an image; 20 steps priced at ~0.3 s, granted
    # A worker far slower than its figures say: each step takes a second longer.
    with replaced(platform, "render", ("render-slow", {"KILN_FAILPOINT": "render.step:slow"})):
        outcome = await client.generate("a red circle", user_id=user, steps=20, timeout_s=120)
    assert isinstance(outcome, RequestFailed), outcome
    assert (outcome.stage, outcome.reason) == ("render", "too_costly"), outcome
    # Stopped at twice the budget plus 2 s (6 s an image), not at the end of its 20 steps.
    stopped = re.match(r"stopped at step (\d+) of 20 after ([\d.]+) s an image; the plan allows 2 s$", outcome.detail)
    assert stopped and int(stopped.group(1)) < 20 and 6 < float(stopped.group(2)) < 10, outcome.detail
    await asyncio.sleep(1)  # quota's refund follows the outcome
    assert (await client.quota(user)).used == 0


async def test_a_waiting_jobs_estimate_adds_up_the_jobs_ahead_of_it(platform: Platform, client: TestClient, tmp_path):
    reading = tmp_path / "gpu-temperature"
    reading.write_text("91")  # too hot: the worker takes nothing, so the jobs wait
    heartbeats = await client.nc.subscribe(subjects.fleet_telemetry("*"))
    with replaced(platform, "render", ("render-paused", {"KILN_INJECT_GPU_TEMPERATURE": str(reading)})):
        pid = platform.services["render-paused"].pid
        beat = await _heartbeat_from(heartbeats, pid, after=utcnow())
        user = f"eta{uuid.uuid4().hex[:8]}"  # one user: their jobs are taken in order
        last = uuid.uuid4().hex[:16]
        progress = await client.nc.subscribe(subjects.render_progress(user, last))
        jobs = [await _queue_job(client, user, steps=20), await _queue_job(client, user, steps=30)]
        jobs.append(await _queue_job(client, user, steps=20, request_id=last))
        queued: RenderProgress = decode((await progress.next_msg(timeout=10)).data)
        assert queued.queue_position == 3
        ahead = cost.estimate_s(beat.step_seconds, 32, 32, 20 + 30)
        assert ahead is not None and queued.eta_s == pytest.approx(ahead, rel=0.5, abs=0.1)
        reading.write_text("70")
        for job in jobs:
            await _render_outcome(client, job, timeout_s=30)
    await heartbeats.unsubscribe()
