"""The overload soak: when the fleet runs hot, Kiln sheds load by plan, with a reason and a
retry time, and loses nothing.

Starts an isolated platform (as the tests do) with bench/soak_plans.toml, then:

1. unloaded: paid requests one at a time, for the paid latency with nothing else running;
2. capacity: a burst of jobs on a plan without limits, for the images/s the one render
   worker delivers when saturated;
3. load: for `--minutes`, open-loop arrivals (Poisson) at three times that capacity, 20 %
   from 10 pro users and 80 % from 120 free users, each request through the SDK's
   `generate`. Every 2 s: the render queue's depth by tier (the workers' heartbeats), the
   fleet pressure quota sees, and each service process's RSS; a service that exits is
   recorded and started again, as `kiln up` does.

Then the report: paid p50/p95 loaded against unloaded, what happened to free requests
(delivered, degraded, denied by reason), paid denials, requests lost (no outcome by the end
of the load plus a grace period), the queue's deepest point against its bound, RSS after
warm-up against the end, and restarts. Printed, and written to bench/results/soak.json.

    python -m bench.soak [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform as host
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg
import msgspec
import nats.errors
import psutil
from opentelemetry import trace

from bench.e2e_latency import RESULTS, percentile
from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import CLIENT_ACCESS, KilnClient, ServiceUnavailable
from services.quota import accounts, plans
from shared import subjects
from shared.bus import Bus, Message
from shared.events import QuotaDenied, RequestFailed, WorkerHeartbeat, decode_json
from shared.settings import DEFAULT_MODEL, Settings

SOAK_PLANS = Path(__file__).with_name("soak_plans.toml")
PROMPT = "a red circle"
STEPS = 10  # the default; elevated pressure renders free images with fewer (degraded)
LOAD_FACTOR = 3.0  # offered load, in multiples of the measured capacity
PAID_SHARE = 0.2
PRO_USERS, FREE_USERS = 10, 120
UNLOADED_REQUESTS = 10
CAPACITY_BURST = 160  # jobs queued at once: ten of the worker's 16-job batches
SAMPLE_EVERY_S = 2.0
GRACE_S = 120.0  # after the load, for the last requests to end; one without an outcome then is lost
WARM_UP_S = 60.0  # RSS is compared from here (or from a quarter of the load, if that is sooner)
CALM_S = 60.0  # the longest wait for the capacity burst's pressure to fall before the load
RETRY_PAUSE_S = 0.5
# Denials a client can act on carry a time to ask again.
RETRYABLE = ("capacity", "rate_limit", "concurrency", "daily_limit")


@dataclass
class Request:
    user: str
    plan: str
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    sent_at: float = 0.0  # seconds into its phase
    latency_s: float | None = None  # sent → outcome read
    outcome: str | None = None  # ImageDelivered, QuotaDenied or RequestFailed; None: lost
    reason: str | None = None  # a denial's or a failure's
    retry_at: datetime | None = None
    degraded: bool = False  # granted with fewer steps than asked (from the quota log)
    lane: str | None = None  # the render lane granted (`critical_paid_lane` names paid work's while critical)
    client_retries: int = 0  # generate() raised (a bus hiccup) and was called again


@dataclass
class Sample:
    at: float  # seconds into the load
    queue_paid: int | None  # jobs waiting or rendering, from the latest heartbeat
    queue_free: int | None
    pressure: str
    rss_mb: dict[str, float]
    cpu_s: dict[str, float]  # CPU seconds so far, of each service and of the soak's own client
    images_per_s: float | None  # what the workers report delivering (their last minute)
    load_avg: float  # the host's 1-minute load average: a shared host's noise shows here


@dataclass
class Watch:
    """What the sampler saw during the load."""

    samples: list[Sample] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)  # service processes that exited on their own
    heartbeats: dict[str, WorkerHeartbeat] = field(default_factory=dict)  # worker → latest


# -- the platform ------------------------------------------------------------------------


@contextlib.contextmanager
def soak_plans() -> Iterator[None]:
    """KILN_PLANS for the services started (or restarted) meanwhile; as it was afterwards."""
    before = os.environ.get("KILN_PLANS")
    os.environ["KILN_PLANS"] = str(SOAK_PLANS)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KILN_PLANS", None)
        else:
            os.environ["KILN_PLANS"] = before


@contextlib.asynccontextmanager
async def soak_platform(data_dir: Path, settings: Settings | None = None) -> AsyncIterator[Platform]:
    """An isolated platform on the soak's plans, with no tracing UI: Phoenix would take a
    core of the worker's under a load that is not about tracing."""
    with soak_plans():
        stack = Platform.isolated(data_dir, DEFAULT_MODEL, settings, tracing_ui=False)
        async with stack.running("kiln_soak"):
            yield stack


async def add_accounts(stack: Platform, users: list[str], plan: str, plans_file: Path = SOAK_PLANS) -> None:
    """`kiln accounts add USER PLAN` for each, against the platform's database."""
    config = plans.load(plans_file)
    conn = await asyncpg.connect(stack.database_url)
    try:
        for user in users:
            await accounts.add(conn, config, user, plan)
    finally:
        await conn.close()


async def connect(stack: Platform) -> KilnClient:
    """The SDK on a connection that reconnects for ever (as tests/faults' client does):
    the admin's credential, since the soak acts for many users."""
    assert stack.nats_url
    bus = await Bus.connect(
        stack.nats_url, ADMIN, trace.get_tracer("kiln.soak"), CLIENT_ACCESS, stack.credentials(ADMIN),
        reconnect_time_wait=0.5, connect_timeout=2,
    )  # fmt: skip
    return KilnClient(bus)


# -- one request -------------------------------------------------------------------------


async def send(client: KilnClient, request: Request, deadline: float) -> None:
    """Ask until the request has an outcome or the deadline (monotonic) passes; asking
    again with the same request id after a bus hiccup is idempotent."""
    started = time.monotonic()
    while (left := deadline - time.monotonic()) > 0:
        try:
            outcome = await client.generate(
                PROMPT, user_id=request.user, request_id=request.request_id, steps=STEPS, timeout_s=left
            )
        except (nats.errors.Error, TimeoutError, OSError):
            request.client_retries += 1
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        request.latency_s = time.monotonic() - started
        request.outcome = type(outcome).__name__
        if isinstance(outcome, QuotaDenied):
            request.reason, request.retry_at = outcome.reason, outcome.retry_at
        elif isinstance(outcome, RequestFailed):
            request.reason = f"{outcome.stage} {outcome.reason}"
        return


# -- the phases --------------------------------------------------------------------------


async def phase_unloaded(client: KilnClient, pro_users: list[str]) -> list[float]:
    """Paid latencies (ms) with nothing else running: one request at a time, after one to
    warm the pipeline up."""
    latencies = []
    for n in range(UNLOADED_REQUESTS + 1):
        request = Request(pro_users[n % len(pro_users)], "pro")
        await send(client, request, time.monotonic() + GRACE_S)
        if request.outcome != "ImageDelivered":
            raise RuntimeError(f"an unloaded paid request was not delivered: {request}")
        if n > 0:
            latencies.append(request.latency_s * 1000)
    return latencies


async def phase_capacity(client: KilnClient, users: list[str]) -> float:
    """Images per second the worker delivers with CAPACITY_BURST jobs queued at once:
    delivered images over the time from the burst to the last delivery."""
    burst = [Request(users[n % len(users)], "capacity") for n in range(CAPACITY_BURST)]
    started = time.monotonic()
    deadline = started + GRACE_S + CAPACITY_BURST  # a generous second per job
    await asyncio.gather(*(send(client, request, deadline) for request in burst))
    delivered = [r for r in burst if r.outcome == "ImageDelivered"]
    if not delivered:
        raise RuntimeError("the capacity burst delivered nothing")
    return len(delivered) / max(r.latency_s for r in delivered)


async def wait_for_calm(client: KilnClient) -> None:
    """Until quota sees normal pressure again (the burst's queue drained), or CALM_S."""
    deadline = time.monotonic() + CALM_S
    while time.monotonic() < deadline and await pressure(client) != "normal":
        await asyncio.sleep(1)


async def phase_load(client: KilnClient, rate: float, seconds: float, users: dict[str, list[str]]) -> list[Request]:
    """Open loop: Poisson arrivals at `rate` a second for `seconds`, sent whatever happened
    to the earlier ones; then every request to its outcome, or to the grace period's end."""
    rng = random.Random(18)
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = time.monotonic() + seconds + GRACE_S
    requests: list[Request] = []
    sending: list[asyncio.Task] = []
    next_at = began + rng.expovariate(rate)
    while next_at < began + seconds:
        await asyncio.sleep(max(0.0, next_at - loop.time()))
        plan = "pro" if rng.random() < PAID_SHARE else "free"
        request = Request(rng.choice(users[plan]), plan, sent_at=loop.time() - began)
        requests.append(request)
        sending.append(asyncio.create_task(send(client, request, deadline)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*sending)
    return requests


# -- watching ----------------------------------------------------------------------------


async def pressure(client: KilnClient) -> str:
    try:
        return (await client.pressure(timeout_s=2))["level"]
    except ServiceUnavailable:
        return "unknown"


async def hear_heartbeats(client: KilnClient, watch: Watch):
    """Keep each worker's latest heartbeat (plain NATS, once a second)."""

    async def on_heartbeat(message: Message) -> None:
        try:
            beat = decode_json(message.data, WorkerHeartbeat)
        except msgspec.DecodeError:
            return
        watch.heartbeats[beat.worker_id] = beat

    return await client.bus.listen(subjects.FLEET_TELEMETRY.pattern, on_heartbeat)


def rss_mb(stack: Platform) -> dict[str, float]:
    rss = {}
    for name, process in stack.services.items():
        with contextlib.suppress(psutil.Error):
            rss[name] = psutil.Process(process.pid).memory_info().rss / 2**20
    return rss


def cpu_s(stack: Platform) -> dict[str, float]:
    """CPU seconds used so far: the services and the soak's client share the host's cores
    with the render worker, whose capacity under load is what is left to it."""
    processes = {name: process.pid for name, process in stack.services.items()} | {"soak client": os.getpid()}
    used = {}
    for name, pid in processes.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            used[name] = round(times.user + times.system, 1)
    return used


def restart_exited(stack: Platform, watch: Watch, at: float) -> None:
    """A service that exited is recorded, and started again as `kiln up` does, so that
    the rest of the soak still runs against a whole platform."""
    for instance, process in list(stack.services.items()):
        if process.poll() is None:
            continue
        watch.exits.append(f"{instance} (pid {process.pid}) exited with {process.returncode} at {at:.0f} s")
        service, env = stack.started_as.get(instance, (instance, {}))
        stack.start_service(service, instance=instance, env=env)


async def sample(stack: Platform, client: KilnClient, watch: Watch) -> None:
    """Every SAMPLE_EVERY_S until cancelled: queue depth by tier, pressure, RSS, exits."""
    began = time.monotonic()
    while True:
        at = time.monotonic() - began
        restart_exited(stack, watch, at)
        beats = list(watch.heartbeats.values())
        watch.samples.append(
            Sample(
                at=round(at, 1),
                # Every worker reports the one shared queue: the latest heartbeats agree.
                queue_paid=max((b.queue_depth_paid for b in beats), default=None),
                queue_free=max((b.queue_depth_free for b in beats), default=None),
                pressure=await pressure(client),
                rss_mb={name: round(mb, 1) for name, mb in rss_mb(stack).items()},
                cpu_s=cpu_s(stack),
                images_per_s=sum(b.images_per_s for b in beats) if beats else None,
                load_avg=os.getloadavg()[0],
            )
        )
        await asyncio.sleep(SAMPLE_EVERY_S)


async def read_grants(stack: Platform, requests: list[Request]) -> None:
    """Each grant's lane and whether it was degraded, from the quota log (an outcome says
    neither)."""
    conn = await asyncpg.connect(stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, payload->>'tier' AS lane, payload->>'degraded' AS degraded FROM quota_events"
            " WHERE event_type = 'QuotaGranted' AND request_id = ANY($1)",
            [r.request_id for r in requests],
        )
    finally:
        await conn.close()
    grants = {row["request_id"]: row for row in rows}
    for request in requests:
        if (grant := grants.get(request.request_id)) is not None:
            request.lane, request.degraded = grant["lane"], grant["degraded"] is not None


# -- the soak ----------------------------------------------------------------------------


async def soak(stack: Platform, minutes: float) -> dict:
    """The three phases on a started platform; the report as a dict."""
    run = uuid.uuid4().hex[:6]
    users = {
        "pro": [f"s{run}pro{n}" for n in range(PRO_USERS)],
        "free": [f"s{run}free{n}" for n in range(FREE_USERS)],
        "capacity": [f"s{run}cap{n}" for n in range(8)],
    }
    await add_accounts(stack, users["pro"], "pro")
    await add_accounts(stack, users["capacity"], "capacity")
    client = await connect(stack)
    watch = Watch()
    try:
        # 1. Unloaded paid latency.
        unloaded = await phase_unloaded(client, users["pro"])
        print(f"unloaded: paid p50 {statistics.median(unloaded):.0f} ms", flush=True)
        # 2. Capacity, then until the burst's pressure has passed.
        capacity = await phase_capacity(client, users["capacity"])
        print(f"capacity: {capacity:.1f} images/s", flush=True)
        await wait_for_calm(client)
        # 3. The load, watched.
        rate = LOAD_FACTOR * capacity
        print(f"load: {rate:.1f} requests/s for {minutes:g} min", flush=True)
        heartbeats = await hear_heartbeats(client, watch)
        sampler = asyncio.create_task(sample(stack, client, watch))
        began = time.monotonic()
        try:
            requests = await phase_load(client, rate, minutes * 60, users)
        finally:
            sampler.cancel()
            await heartbeats.unsubscribe()
        took_s = time.monotonic() - began
        await read_grants(stack, requests)
    finally:
        await client.close()
    return report(unloaded, capacity, rate, minutes, requests, watch, took_s)


# -- the report --------------------------------------------------------------------------


def latency_ms(requests: list[Request]) -> dict[str, float | None]:
    values = [r.latency_s * 1000 for r in requests if r.latency_s is not None]
    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None}
    return {"n": len(values), "p50_ms": round(statistics.median(values), 1), "p95_ms": round(percentile(values, 95), 1)}


def outcomes(requests: list[Request]) -> dict:
    denied = [r for r in requests if r.outcome == "QuotaDenied"]
    failed = [r for r in requests if r.outcome == "RequestFailed"]
    delivered = [r for r in requests if r.outcome == "ImageDelivered"]
    return {
        "sent": len(requests),
        "delivered": len(delivered),
        "degraded": sum(r.degraded for r in delivered),
        "denied": dict(Counter(r.reason for r in denied).most_common()),
        "failed": dict(Counter(r.reason for r in failed).most_common()),
        "lost": sum(r.outcome is None for r in requests),
        "delivered_latency": latency_ms(delivered),
        "delivered_latency_by_lane": {
            lane: latency_ms([r for r in delivered if r.lane == lane]) for lane in sorted({r.lane for r in delivered})
        },
    }


def rss_change(samples: list[Sample], load_s: float) -> dict[str, dict[str, float]]:
    """Each service's RSS after warm-up and at the end of the load, and the change."""
    warm_at = min(WARM_UP_S, load_s / 4)
    warm = next((s for s in samples if s.at >= warm_at), samples[0])
    end = samples[-1]
    return {
        name: {
            "warm_mb": warm.rss_mb[name],
            "end_mb": end.rss_mb[name],
            "change_pct": round(100 * (end.rss_mb[name] - warm.rss_mb[name]) / warm.rss_mb[name], 1),
        }
        for name in warm.rss_mb
        if name in end.rss_mb
    }


def cpu_share(samples: list[Sample]) -> dict[str, float]:
    """Each process's share of the host's CPU over the load, in % of all its cores."""
    first, last = samples[0], samples[-1]
    seconds = max(last.at - first.at, 1e-9) * (os.cpu_count() or 1)
    return {
        name: round(100 * (last.cpu_s[name] - first.cpu_s[name]) / seconds, 1)
        for name in last.cpu_s
        if name in first.cpu_s
    }


def queue_depth(samples: list[Sample]) -> dict[str, int]:
    """The deepest the render queue got, against its bound: each user's requests in flight
    are capped by their plan's `max_active`, so the queue cannot hold more than the sum of
    that over the soak's users, however long the overload lasts."""
    config = plans.load(SOAK_PLANS)
    bound = PRO_USERS * config.plan("pro").max_active + FREE_USERS * config.plan("free").max_active
    paid = [s.queue_paid for s in samples if s.queue_paid is not None]
    free = [s.queue_free for s in samples if s.queue_free is not None]
    total = [s.queue_paid + s.queue_free for s in samples if s.queue_paid is not None and s.queue_free is not None]
    return {"max": max(total, default=0), "max_paid": max(paid, default=0), "max_free": max(free, default=0),
            "bound": bound}  # fmt: skip


def worker_rates(samples: list[Sample]) -> list[float]:
    """The workers' own images/s once they have a minute of the load behind them (or a
    quarter of it, if shorter)."""
    settled = min(60.0, samples[-1].at / 4)
    return [s.images_per_s for s in samples if s.images_per_s is not None and s.at >= settled]


def report(
    unloaded: list[float],
    capacity: float,
    rate: float,
    minutes: float,
    requests: list[Request],
    watch: Watch,
    took_s: float,
) -> dict:
    paid = [r for r in requests if r.plan == "pro"]
    free = [r for r in requests if r.plan == "free"]
    denials = [r for r in requests if r.outcome == "QuotaDenied"]
    unloaded_p95 = percentile(unloaded, 95)
    paid_figures = outcomes(paid)
    loaded_p95 = paid_figures["delivered_latency"]["p95_ms"]
    return {
        "benchmark": "soak",
        "host": f"{host.node()} ({os.cpu_count()} cpus)",
        "minutes": minutes,
        "took_s": round(took_s, 1),
        "capacity_images_per_s": round(capacity, 2),
        "offered_per_s": round(rate, 2),
        "sent_per_s": round(len(requests) / (minutes * 60), 2),
        "paid_unloaded": {"p50_ms": round(statistics.median(unloaded), 1), "p95_ms": round(unloaded_p95, 1)},
        "paid_p95_loaded_over_unloaded": round(loaded_p95 / unloaded_p95, 2) if loaded_p95 else None,
        "paid": paid_figures,
        "free": outcomes(free),
        "denials_without_reason": sum(not r.reason for r in denials),
        "denials_without_retry_time": sum(r.reason in RETRYABLE and r.retry_at is None for r in denials),
        "client_retries": sum(r.client_retries for r in requests),
        "queue_depth": queue_depth(watch.samples),
        "worker_images_per_s_median": statistics.median(rates) if (rates := worker_rates(watch.samples)) else None,
        "cpu_share_pct": cpu_share(watch.samples),
        "pressure_samples": dict(Counter(s.pressure for s in watch.samples)),
        "host_load_avg_max": max((s.load_avg for s in watch.samples), default=None),
        "rss": rss_change(watch.samples, minutes * 60),
        "restarts": watch.exits,
        "samples": [asdict(s) for s in watch.samples],
    }


def goals(result: dict) -> dict[str, bool]:
    """What the soak promises, each met or not (the figures are the run's own)."""
    ratio = result["paid_p95_loaded_over_unloaded"]
    return {
        "paid p95 loaded <= 2x unloaded": ratio is not None and ratio <= 2,
        "no request lost": result["paid"]["lost"] + result["free"]["lost"] == 0,
        "paid never denied for capacity": "capacity" not in result["paid"]["denied"],
        "every denial has a reason and a retry time": not result["denials_without_reason"]
        and not result["denials_without_retry_time"],
        "free load shed (degraded or denied)": result["free"]["degraded"] + sum(result["free"]["denied"].values()) > 0,
        "queue depth within its bound": result["queue_depth"]["max"] <= result["queue_depth"]["bound"],
        "RSS within +-10 % after warm-up": all(abs(r["change_pct"]) <= 10 for r in result["rss"].values()),
        "no service restarted": not result["restarts"],
    }


def print_report(result: dict) -> None:
    unloaded, paid, free = result["paid_unloaded"], result["paid"], result["free"]
    loaded = paid["delivered_latency"]
    print(
        f"\nsoak: {result['minutes']:g} min at {result['offered_per_s']:.1f} requests/s offered "
        f"({LOAD_FACTOR:g}x the worker's {result['capacity_images_per_s']:.1f} images/s), {result['host']}"
    )
    print(f"{'':<28}{'paid':>12}{'free':>12}")
    for label, key in (("sent", "sent"), ("delivered", "delivered"), ("  of which degraded", "degraded"),
                       ("failed", "failed"), ("lost", "lost")):  # fmt: skip
        values = [sum(f[key].values()) if isinstance(f[key], dict) else f[key] for f in (paid, free)]
        print(f"{label:<28}{values[0]:>12}{values[1]:>12}")
    for reason in sorted(set(paid["denied"]) | set(free["denied"])):
        print(f"{'denied: ' + reason:<28}{paid['denied'].get(reason, 0):>12}{free['denied'].get(reason, 0):>12}")
    print(
        f"paid latency, ms: unloaded p50 {unloaded['p50_ms']:.0f} p95 {unloaded['p95_ms']:.0f}; "
        f"loaded p50 {loaded['p50_ms']} p95 {loaded['p95_ms']}; p95 ratio {result['paid_p95_loaded_over_unloaded']}"
    )
    for lane, figures in paid["delivered_latency_by_lane"].items():
        print(f"  paid in the {lane} lane: {figures['n']} delivered, p50 {figures['p50_ms']} p95 {figures['p95_ms']}")
    print(f"denials without a reason: {result['denials_without_reason']}, "
          f"without a retry time: {result['denials_without_retry_time']}; client retries: {result['client_retries']}")  # fmt: skip
    depth = result["queue_depth"]
    print(f"queue depth max {depth['max']} (paid {depth['max_paid']}, free {depth['max_free']}); "
          f"bound {depth['bound']} (the users' max_active summed)")  # fmt: skip
    print(f"pressure samples: {result['pressure_samples']}; host load average up to {result['host_load_avg_max']}")
    print(f"render worker under load: {result['worker_images_per_s_median']} images/s (median of its heartbeats)")
    print(f"{'process':<28}{'RSS warm MB':>12}{'end MB':>10}{'change':>10}{'CPU share':>11}")
    for name, share in result["cpu_share_pct"].items():
        rss = result["rss"].get(name)
        memory = f"{rss['warm_mb']:>12.1f}{rss['end_mb']:>10.1f}{rss['change_pct']:>9.1f}%" if rss else " " * 31
        print(f"{name:<28}{memory}{share:>10.1f}%")
    print(f"restarts: {result['restarts'] or 0}")
    for goal, met in result["goals"].items():
        print(f"  [{'met' if met else 'NOT met'}] {goal}")


async def main_async(minutes: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="kiln-soak-") as tmp:
        async with soak_platform(Path(tmp) / "kiln") as stack:
            result = await soak(stack, minutes)
    result["goals"] = goals(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the 3x load lasts")
    args = parser.parse_args()
    result = asyncio.run(main_async(args.minutes))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "soak.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
