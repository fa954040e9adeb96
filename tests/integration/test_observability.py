"""Traces in the tracing UI, each service's metrics endpoint, and `kiln status`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid

import httpx
import pytest

from infra.platform import Platform
from kiln.client import KilnClient
from shared import subjects
from shared.events import ImageDelivered, RenderRequested, decode, encode
from shared.settings import PROJECT_ROOT
from shared.telemetry import use_user_ref_key, user_ref

pytestmark = pytest.mark.integration


async def _kiln(platform: Platform, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it beside `kiln up`: told only where the bus and the data
    folder are; where traces go it learns from the running platform."""
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_OTLP_ENDPOINT", "KILN_TRACE_URL")}
    env |= {"KILN_NATS_URL": platform.nats_url, "KILN_DATA_DIR": str(platform.data_dir), "COLUMNS": "200"}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "kiln", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


async def _spans(platform: Platform, trace_id: str, services: set[str], timeout_s: float = 30) -> list[dict]:
    """The trace's spans as the tracing UI's API returns them, once every service's are in
    and every parent has arrived (spans export in batches, each process on its own)."""
    url = f"{platform.otlp_endpoint}/v1/projects/default/spans"
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(int(timeout_s / 0.5)):
            spans = (await http.get(url, params={"trace_id": trace_id, "limit": 1000})).json()["data"]
            ids = {span["context"]["span_id"] for span in spans}
            complete = all(span["parent_id"] in ids for span in spans if span["parent_id"] is not None)
            if complete and services <= {span["attributes"].get("service.name") for span in spans}:
                return spans
            await asyncio.sleep(0.5)
    return spans


# The messages one request's services handle: (service, event).
_HANDLED = [
    ("quota", "PromptSubmitted"),
    ("context", "QuotaGranted"),
    ("render", "RenderRequested"),
    ("delivery", "RenderCompleted"),
]


async def test_one_generate_is_one_trace_across_the_client_and_four_services_in_the_tracing_ui(
    platform: Platform, user: str
):
    if platform.trace_url is None:
        pytest.skip("no tracing UI: `make test` installs Phoenix")
    result = await _kiln(platform, "generate", "a red circle", "--user", user)
    assert result.returncode == 0, result.stderr
    trace_id = re.search(r"trace: \S+/redirects/traces/([0-9a-f]{32})", result.stderr).group(1)
    services = {"kiln-cli", "quota", "context", "render", "delivery"}
    spans = await _spans(platform, trace_id, services)
    assert {span["attributes"].get("service.name") for span in spans} >= services
    by_id = {span["context"]["span_id"]: span for span in spans}
    named = {span["name"]: span for span in spans}

    def parent(name: str) -> str:
        return by_id[named[name]["parent_id"]]["name"]

    # One root, the CLI's; every other span's parent is in the same trace.
    roots = [span["name"] for span in spans if span["parent_id"] is None]
    assert roots == ["kiln cli"], roots
    orphans = [span["name"] for span in spans if span["parent_id"] is not None and span["parent_id"] not in by_id]
    assert not orphans, orphans
    # The request's path, each step a child of the one that sent it on: a message's
    # handling is a child of its publish.
    assert parent("kiln generate") == "kiln cli"
    assert parent("publish PromptSubmitted") == "kiln generate"
    assert parent("quota PromptSubmitted") == "publish PromptSubmitted"
    assert parent("quota log append") == "quota PromptSubmitted"
    assert parent("publish QuotaGranted") == "quota PromptSubmitted"
    assert parent("context QuotaGranted") == "publish QuotaGranted"
    assert parent("context compose") == "context QuotaGranted"
    assert parent("publish RenderRequested") == "context QuotaGranted"
    assert parent("render queue wait") == "publish RenderRequested"  # waiting for a GPU, its own span
    assert parent("render RenderRequested") == "publish RenderRequested"
    assert parent("render batch") == "render RenderRequested"
    assert parent("image store put") == "render RenderRequested"
    assert parent("publish RenderCompleted") == "render RenderRequested"
    assert parent("delivery RenderCompleted") == "publish RenderCompleted"
    assert parent("delivery record image") == "delivery RenderCompleted"
    # Each span's kind, as an attribute (Phoenix keeps no other trace of it).
    kinds = {name: named[name]["attributes"]["kiln.span_kind"] for name in named}
    assert {kinds["kiln cli"], kinds["kiln generate"]} == {"client"}
    assert {kinds[name] for name in named if name.startswith("publish ")} == {"producer"}
    assert {kinds[f"{service} {event}"] for service, event in _HANDLED} == {"consumer"}
    assert {kinds["render batch"], kinds["context compose"]} == {"internal"}
    assert {span["status_code"] for span in spans} == {"UNSET"}  # nothing failed

    wait = named["render queue wait"]
    assert wait["end_time"] > wait["start_time"]
    batch = named["render batch"]
    assert {k: batch["attributes"][k] for k in ("kiln.batch_size", "kiln.steps", "kiln.model", "kiln.device")} == {
        "kiln.batch_size": 1,
        "kiln.steps": 10,
        "kiln.model": "kiln-shapes",
        "kiln.device": "cpu",
    }
    assert batch["attributes"]["kiln.worker_id"]
    assert [event["attributes"]["kiln.step"] for event in batch["events"]] == list(range(1, 11))  # step timings
    assert named["quota PromptSubmitted"]["attributes"]["kiln.decision"] == "granted"
    # Users appear hashed, never by name.
    assert user not in json.dumps(spans)
    # A keyed hash (the deployment's key, in the data folder): nobody without the key can
    # test a guessed id against it.
    use_user_ref_key(platform.data_dir)
    assert named["kiln generate"]["attributes"]["kiln.user"] == user_ref(user)
    assert user_ref(user) != hashlib.sha256(f"kiln-user:{user}".encode()).hexdigest()[:16]


async def _metrics(port: int) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    return response.text


def _value(text: str, series: str) -> float:
    """The value of one series (`name{labels}` as exposed, labels in any order)."""
    name, _, labels = series.partition("{")
    wanted = set(labels.rstrip("}").split(",")) - {""}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            metric, value = line.rsplit(" ", 1)
            have = set(metric.partition("{")[2].rstrip("}").split(","))
            if metric.partition("{")[0] == name and wanted <= have:
                return float(value)
    raise AssertionError(f"no series {series} in:\n{text}")


async def test_each_service_serves_its_metrics_with_live_values(platform: Platform, client: KilnClient, user: str):
    for _ in range(3):
        delivered = await client.generate("a red circle", user_id=user)
        assert isinstance(delivered, ImageDelivered)
    await client.generate("a red circle", user_id=user)  # the fourth: denied
    await client.download(delivered)  # by its signed link
    async with httpx.AsyncClient(base_url=platform.http_url, timeout=10) as http:
        assert (await http.get(f"/images/{user}/{delivered.request_id}.png")).status_code == 403  # no session
        assert (await http.get(f"/no/such/page/{user}")).status_code == 404
    await asyncio.sleep(1.5)  # a heartbeat or two

    quota = await _metrics(platform.metrics_ports["quota"])
    assert _value(quota, 'kiln_requests_total{outcome="delivered",plan="free"}') >= 3
    assert _value(quota, 'kiln_requests_total{outcome="denied",plan="free"}') >= 1
    assert _value(quota, 'kiln_quota_denials_total{reason="daily_limit",plan="free"}') >= 1
    assert _value(quota, 'kiln_fleet_pressure{level="normal"}') == 0

    context = await _metrics(platform.metrics_ports["context"])
    assert _value(context, 'kiln_context_turns_total{kind="new"}') >= 3

    render = await _metrics(platform.metrics_ports["render"])
    assert _value(render, 'kiln_render_queue_depth{tier="paid"}') >= 0
    assert _value(render, 'kiln_render_queue_depth{tier="free"}') >= 0
    assert _value(render, "kiln_render_batch_size_count") >= 3
    assert _value(render, "kiln_render_duration_seconds_count") >= 3
    assert _value(render, "kiln_render_duration_seconds_sum") > 0
    assert _value(render, "kiln_render_images_per_second") > 0
    assert _value(render, "kiln_cpu_load_per_core") > 0  # a CPU host: the CPU figure stands in for the GPU's
    assert _value(render, "kiln_render_batch_limit") >= 1

    delivery = await _metrics(platform.metrics_ports["delivery"])
    assert _value(delivery, 'kiln_delivery_outcomes_total{outcome="delivered"}') >= 3
    # End to end, from the prompt's submission, in buckets up to 10 minutes.
    latency = 'kiln_request_latency_seconds_{}{{outcome="delivered",plan="free",tier="free"{}}}'
    assert _value(delivery, latency.format("count", "")) >= 3
    assert _value(delivery, latency.format("sum", "")) > 0
    assert _value(delivery, latency.format("bucket", ',le="600"')) >= 3
    # HTTP requests by route template and status: no path, so no user or request id.
    image = 'route="/images/{user_id}/{request_id}.png",method="GET"'
    assert _value(delivery, f'kiln_http_requests_total{{{image},status="200"}}') >= 1
    assert _value(delivery, f'kiln_http_requests_total{{{image},status="403"}}') >= 1
    assert _value(delivery, 'kiln_http_requests_total{route="/healthz",method="GET",status="200"}') >= 1
    assert _value(delivery, 'kiln_http_requests_total{route="unmatched",method="GET",status="404"}') >= 1
    assert _value(delivery, f'kiln_http_request_duration_seconds_count{{{image},status="200"}}') >= 1
    assert _value(delivery, f'kiln_http_request_duration_seconds_bucket{{{image},status="200",le="600"}}') >= 1
    assert user not in delivery and delivered.request_id not in delivery


async def test_render_metrics_show_jobs_in_flight_their_queue_wait_and_renders_up_to_ten_minutes(
    platform: Platform, client: KilnClient, user: str
):
    port = platform.metrics_ports["render"]
    job = RenderRequested(
        request_id=uuid.uuid4().hex[:16], user_id=user, prompt="a red circle", width=32, height=32, steps=400, seed=1
    )
    progress = await client.nc.subscribe(subjects.render_progress(user, job.request_id))
    before = await _metrics(port)
    # A job put on the queue by hand (as context would), long enough to scrape mid-render.
    await client.js.publish(subjects.render_job("free", user), encode(job))
    while decode((await progress.next_msg(timeout=60)).data).state != "rendering":
        pass
    during = await _metrics(port)
    await progress.unsubscribe()
    assert isinstance(await client.wait_for_outcome(user, job.request_id, timeout_s=120), ImageDelivered)
    after = await _metrics(port)

    assert _value(during, "kiln_render_in_flight") >= 1
    assert _value(after, "kiln_render_in_flight") == 0
    waits = 'kiln_render_queue_wait_seconds_count{tier="free"}'
    assert _value(after, waits) == _count(before, waits) + 1
    assert _value(after, 'kiln_render_queue_wait_seconds_bucket{le="600",tier="free"}') >= 1
    # A long render lands in a bucket of its own, not only in +Inf.
    assert _value(after, 'kiln_render_duration_seconds_bucket{le="600"}') >= 1
    assert _value(after, 'kiln_render_duration_seconds_bucket{le="300"}') >= 1
    # No scope labels on every series (one meter per service: they would only repeat its name).
    assert "otel_scope_" not in after


def _count(text: str, series: str) -> float:
    """A series' value, 0 if it is not there yet (no job recorded before)."""
    try:
        return _value(text, series)
    except AssertionError:
        return 0


async def test_kiln_status_shows_the_workers_queue_and_pressure(platform: Platform):
    result = await _kiln(platform, "status", "--once")
    assert result.returncode == 0, result.stderr
    print(result.stdout)  # shown when the test fails
    pid = platform.services["render"].pid
    assert re.search(rf"\S+-{pid}\s+│\s+cpu\s+│\s+kiln-shapes", result.stdout), result.stdout
    assert "queue: paid 0, free 0" in result.stdout and "pressure: normal" in result.stdout
    assert re.search(r"last 10 min: \d+ shed, \d+ degraded", result.stdout), result.stdout


async def test_kiln_status_shows_what_each_worker_is_rendering_and_for_how_long(
    platform: Platform, client: KilnClient, user: str
):
    job = RenderRequested(
        request_id=uuid.uuid4().hex[:16], user_id=user, prompt="a red circle", width=32, height=32, steps=500, seed=1
    )
    progress = await client.nc.subscribe(subjects.render_progress(user, job.request_id))
    await client.js.publish(subjects.render_job("free", user), encode(job))  # a long job, as context would
    try:
        while decode((await progress.next_msg(timeout=60)).data).state != "rendering":
            pass
        result = await _kiln(platform, "status", "--once")
    finally:
        await progress.unsubscribe()
        await client.cancel(user, job.request_id)  # no need to draw it all
    assert result.returncode == 0, result.stderr
    assert re.search(rf"1 for \d+ s: {user}/{job.request_id}", result.stdout), result.stdout
