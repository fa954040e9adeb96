"""Proof under faults: while a closed loop of clients sends N_REQUESTS prompts for N_USERS
users (half on the free plan, which allows 3 of their 10 a day, half on pro), each service
is SIGKILLed and started again in turn, then NATS is restarted, then PostgreSQL, then quota
dies between committing its decisions and publishing them.

Afterwards the records are checked, not the services' counters: each request's one outcome
in the KILN_OUTCOMES stream, the quota log in PostgreSQL (grants, refunds, `kiln audit
verify`) and the image bucket. Nothing may be lost, nothing delivered twice, no user granted
more than the plan allows. The -s output has a table per fault: requests in flight, lost,
duplicated, over-granted, and seconds from the fault to the next delivered image.

Slow (minutes) and hard on the machine: run by `make test-faults` (KILN_FAULTS=1) only. The
NATS and PostgreSQL restarts need the embedded servers; with KILN_NATS_URL /
KILN_DATABASE_URL set they are skipped and the rest runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from opentelemetry import trace

from bench.soak import add_accounts
from infra.nats_auth import ADMIN
from infra.platform import Platform
from kiln.client import CLIENT_ACCESS, KilnClient
from services.quota import log as quota_log
from shared import subjects
from shared.bus import Bus
from shared.events import ImageDelivered, QuotaDenied, RequestFailed
from shared.failpoints import EXIT_CODE
from shared.records import Outcome
from shared.settings import PROJECT_ROOT
from tests.conftest import TEST_PLANS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.environ.get("KILN_FAULTS") != "1", reason="the fault suite runs by `make test-faults`"),
]

N_REQUESTS = 500
N_USERS = 50  # 10 requests each: a free user's last 7 are denied, a pro user's all drawn
PRO_PLAN = "pro"  # tests/integration/plans.toml: 100 a day, a burst of 50
CONCURRENT = 8  # clients in the closed loop, each with one request in flight
STEPS = 4  # a short render: the faults, not the GPU, are under test
IN_FLIGHT_S = 1.0  # from releasing a share of the requests to the fault: some are mid-way
REQUEST_DEADLINE_S = 300  # a request with no outcome by then is lost
RECOVERY_DEADLINE_S = 180
REFUND_WAIT_S = 30


@dataclass
class Request:
    user: str
    request_id: str
    sent_at: float | None = None  # wall clock (time.time), comparable with the events' times
    ended_at: float | None = None
    outcome: Outcome | None = None
    client_retries: int = 0  # generate() raised (the bus was away) and was called again


@dataclass
class Fault:
    name: str
    inject: Callable[[Platform], Awaitable[None]]
    at: float | None = None  # when it struck (wall clock)
    skipped: str | None = None
    recovery_s: float | None = None
    in_flight: list[Request] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)  # services that exited on their own after it


# -- the faults --------------------------------------------------------------------------


def _kill_and_restart(service: str) -> Callable[[Platform], Awaitable[None]]:
    async def inject(platform: Platform) -> None:
        platform.stop_service(service, signal.SIGKILL)
        platform.start_service(service)

    return inject


async def _restart_nats(platform: Platform) -> None:
    # Same port, same store. The services must reconnect on their own (Bus.connect: "a bus
    # outage pauses it, it does not end it"); none is restarted here.
    nats_server = platform._nats  # noqa: SLF001 — the launcher keeps its embedded server private
    assert nats_server is not None
    await asyncio.to_thread(nats_server.stop)
    await asyncio.to_thread(nats_server.start)


async def _restart_postgres(platform: Platform) -> None:
    postgres = platform.embedded_postgres
    assert postgres is not None
    await asyncio.to_thread(postgres.stop)
    await asyncio.to_thread(postgres.start)


async def _kill_quota_between_commit_and_publish(platform: Platform) -> None:
    """Quota, replaced by one that dies (os._exit) right after its first commit, before it
    publishes; then the usual quota again, whose relay must publish what the log holds."""
    platform.stop_service("quota", signal.SIGKILL)
    doomed = platform.start_service("quota", env={"KILN_FAILPOINT": "quota.after_commit"})
    code = await asyncio.to_thread(doomed.wait, 120)
    assert code == EXIT_CODE, f"quota with the failpoint exited with {code}, not at the failpoint"
    platform.stop_service("quota")
    platform.start_service("quota")


def _faults(platform: Platform) -> list[Fault]:
    """The faults in the order they strike; a server restart only where the server is ours."""
    external_nats = platform._nats is None  # noqa: SLF001
    external_postgres = platform.embedded_postgres is None
    return [
        *(Fault(f"SIGKILL {name}", _kill_and_restart(name)) for name in ("quota", "context", "render", "delivery")),
        Fault("restart NATS", _restart_nats, skipped="external NATS (KILN_NATS_URL)" if external_nats else None),
        Fault(
            "restart PostgreSQL",
            _restart_postgres,
            skipped="external PostgreSQL (KILN_DATABASE_URL)" if external_postgres else None,
        ),
        Fault("quota dies after commit", _kill_quota_between_commit_and_publish),
    ]


# -- the load ----------------------------------------------------------------------------


@pytest_asyncio.fixture
async def kiln(platform: Platform) -> AsyncIterator[KilnClient]:
    """The SDK on a connection that, like a service's, reconnects for ever: the fixture's
    client gives up after three tries, shorter than a NATS restart."""
    assert platform.nats_url
    bus = await Bus.connect(
        platform.nats_url, ADMIN, trace.get_tracer("kiln.faults"), CLIENT_ACCESS, platform.credentials(ADMIN),
        reconnect_time_wait=0.5, connect_timeout=2,
    )  # fmt: skip
    async with KilnClient(bus) as client:
        yield client


async def _send(kiln: KilnClient, request: Request, steps: int = STEPS, deadline_s: float = REQUEST_DEADLINE_S) -> None:
    """Ask until the request has an outcome or its deadline passes. generate() raises when
    the bus is away (a publish or lookup during a NATS restart); asking again with the same
    request id is what a client does, and is idempotent."""
    request.sent_at = time.time()
    deadline = time.monotonic() + deadline_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            request.outcome = await kiln.generate(
                "a red circle", user_id=request.user, request_id=request.request_id, steps=steps, timeout_s=left
            )
            request.ended_at = time.time()
            return
        except (nats.errors.Error, TimeoutError, OSError):
            request.client_retries += 1
            await asyncio.sleep(0.5)


async def _closed_loop(
    kiln: KilnClient,
    released: asyncio.Queue[Request | None],
    clients: int = CONCURRENT,
    steps: int = STEPS,
    deadline_s: float = REQUEST_DEADLINE_S,
) -> None:
    """`clients` clients, each sending the next released request when its last one ended;
    a None ends a client."""

    async def client() -> None:
        while (request := await released.get()) is not None:
            await _send(kiln, request, steps, deadline_s)

    await asyncio.gather(*(client() for _ in range(clients)))


async def _next_delivery_after(requests: list[Request], since: float) -> float:
    """Seconds from `since` to the first image delivered after it (the event's own time)."""
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    while time.monotonic() < deadline:
        delivered = [
            r.outcome.delivered_at.timestamp()
            for r in requests
            if isinstance(r.outcome, ImageDelivered) and r.outcome.delivered_at.timestamp() > since
        ]
        if delivered:
            return min(delivered) - since
        await asyncio.sleep(0.2)
    raise AssertionError(f"no image delivered within {RECOVERY_DEADLINE_S} s of the fault")


class Supervisor:
    """Restarts a service that exits on its own, as `kiln up` does (kiln/cli.py `_supervise`),
    so that one crash does not hide what the later faults do; each exit is recorded against
    the fault before it, and fails the test. Paused while a fault stops services on purpose."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.paused = False
        self.fault: Fault | None = None
        self.exits: list[str] = []

    async def run(self) -> None:
        while True:
            if not self.paused:
                self._restart_exited()
            await asyncio.sleep(0.5)

    def _restart_exited(self) -> None:
        for instance, process in list(self.platform.services.items()):
            if process.poll() is None:
                continue
            after = self.fault.name if self.fault else "no fault"
            exit = f"{instance} exited with {process.returncode} (after {after})"
            print(exit, flush=True)
            self.exits.append(exit)
            if self.fault is not None:
                self.fault.crashed.append(instance)
            service, env = self.platform.started_as.get(instance, (instance, {}))
            self.platform.start_service(service, instance=instance, env=env)


def _in_flight(requests: list[Request], at: float) -> list[Request]:
    return [r for r in requests if r.sent_at is not None and r.sent_at <= at and (r.ended_at or float("inf")) >= at]


# -- the checks --------------------------------------------------------------------------


@dataclass
class Findings:
    lost: set[str] = field(default_factory=set)  # request ids with no outcome
    duplicated: dict[str, str] = field(default_factory=dict)  # request id → what was twice
    unrefunded: set[str] = field(default_factory=set)  # failed after a grant, never refunded
    over_granted: dict[str, str] = field(default_factory=dict)  # user → net grants today, of its limit
    oddities: list[str] = field(default_factory=list)


async def _check_outcomes(js: nats.js.JetStreamContext, kiln: KilnClient, requests: list[Request], found: Findings):
    """Each request's one outcome, as the OUTCOMES stream keeps it (not as the client heard it)."""
    for r in requests:
        subject = subjects.outcome(r.user, r.request_id)
        info = await js.stream_info(subjects.OUTCOMES.name, subjects_filter=subject)
        count = (info.state.subjects or {}).get(subject, 0)
        if count == 0:
            found.lost.add(r.request_id)
        elif count > 1:
            found.duplicated[r.request_id] = f"{count} outcomes"
        recorded = await kiln.recorded_outcome(r.user, r.request_id)
        if recorded is not None and r.outcome is not None and type(recorded) is not type(r.outcome):
            found.oddities.append(f"{r.request_id}: the client heard {type(r.outcome).__name__}, stored {recorded}")
        r.outcome = recorded or r.outcome


async def _check_quota_log(db: asyncpg.Connection, requests: list[Request], found: Findings) -> None:
    """From the log itself: one decision per request, a refund for each granted request that
    failed, and no user over the plan's daily limit once refunds are counted."""
    users = sorted({r.user for r in requests})
    streams = [quota_log.user_stream(user) for user in users]
    failed = {r.request_id for r in requests if isinstance(r.outcome, RequestFailed)}
    deadline = time.monotonic() + REFUND_WAIT_S  # a refund follows the failed outcome
    while True:
        rows = await db.fetch(
            "SELECT stream_id, request_id, event_type, payload FROM quota_events WHERE stream_id = ANY($1)", streams
        )
        granted = {row["request_id"] for row in rows if row["event_type"] == "QuotaGranted"}
        refunded = {row["request_id"] for row in rows if row["event_type"] == "QuotaRefunded"}
        if not (failed & granted) - refunded or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    found.unrefunded = (failed & granted) - refunded

    decisions: dict[str, int] = {}
    net: dict[tuple[str, str], int] = {}  # (stream, day) → grants less refunds
    limit: dict[tuple[str, str], int] = {}  # (stream, day) → the most a grant said was allowed
    day_of: dict[str, str] = {}
    for row in rows:
        payload = json.loads(row["payload"])
        if row["event_type"] in ("QuotaGranted", "QuotaDenied"):
            decisions[row["request_id"]] = decisions.get(row["request_id"], 0) + 1
        if row["event_type"] == "QuotaGranted":
            day_of[row["request_id"]] = payload["day"]
            key = (row["stream_id"], payload["day"])
            net[key] = net.get(key, 0) + 1
            limit[key] = max(limit.get(key, 0), payload["limit"])
    for row in rows:
        if row["event_type"] == "QuotaRefunded" and row["request_id"] in day_of:
            key = (row["stream_id"], day_of[row["request_id"]])
            net[key] -= 1
    for request_id, count in decisions.items():
        if count > 1:
            found.duplicated[request_id] = f"{count} quota decisions"
    for (stream, day), count in net.items():
        if count > limit[(stream, day)]:
            found.over_granted[stream.removeprefix("user:")] = f"{count} of {limit[(stream, day)]}"
    for r in requests:
        if isinstance(r.outcome, ImageDelivered) and r.request_id not in granted:
            found.oddities.append(f"{r.request_id}: delivered with no grant in the log")


async def _check_images(js: nats.js.JetStreamContext, requests: list[Request], found: Findings) -> None:
    """One stored PNG per delivered request, none for the others; and none written again
    after its delivery (a second render of a delivered request). (A put replaces the PNG
    under the same key, so the bucket alone cannot show a second render before delivery.)"""
    store = await js.object_store(subjects.IMAGES.name)
    for r in requests:
        try:
            info = await store.get_info(subjects.image_key(r.user, r.request_id))
        except nats.js.errors.ObjectNotFoundError:
            info = None
        if isinstance(r.outcome, ImageDelivered):
            if info is None:
                found.oddities.append(f"{r.request_id}: delivered, but no image in the bucket")
            elif info.mtime and datetime.fromisoformat(info.mtime) > r.outcome.delivered_at:
                found.duplicated[r.request_id] = "image stored again after its delivery"
        elif info is not None:
            found.oddities.append(f"{r.request_id}: {type(r.outcome).__name__}, yet an image is stored")


def _audit_verify(platform: Platform) -> subprocess.CompletedProcess:
    """`kiln audit verify` as an operator runs it on this platform: the chain, and the
    signed checkpoints from their stream."""
    env = os.environ | {
        "KILN_DATABASE_URL": platform.database_url or "",
        "KILN_NATS_URL": platform.nats_url or "",
        "KILN_DATA_DIR": str(platform.data_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "kiln", "audit", "verify"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the run -----------------------------------------------------------------------------


async def test_no_request_is_lost_duplicated_or_over_granted_while_everything_fails_in_turn(
    platform: Platform, kiln: KilnClient
):
    run = uuid.uuid4().hex[:6]
    users = [f"f{run}u{n}" for n in range(N_USERS)]
    await add_accounts(platform, users[1::2], PRO_PLAN, TEST_PLANS)
    # Users interleaved, so that each user's requests are spread over the faults.
    requests = [Request(users[n % N_USERS], uuid.uuid4().hex) for n in range(N_REQUESTS)]
    faults = _faults(platform)
    live = [f for f in faults if f.skipped is None]
    # 1. A share of the requests before the faults, then one share released just before each.
    shares = [requests[i :: len(live) + 1] for i in range(len(live) + 1)]
    released: asyncio.Queue[Request | None] = asyncio.Queue()
    loop = asyncio.ensure_future(_closed_loop(kiln, released))
    supervisor = Supervisor(platform)
    supervising = asyncio.ensure_future(supervisor.run())
    started = time.monotonic()
    try:
        for request in shares[0]:
            released.put_nowait(request)
        await _next_delivery_after(requests, time.time() - 1)  # the platform serves
        # 2. Each fault while requests are in flight; the next only once images flow again.
        for fault, share in zip(live, shares[1:], strict=True):
            for request in share:
                released.put_nowait(request)
            await asyncio.sleep(IN_FLIGHT_S)
            fault.at = time.time()
            print(f"{fault.name}: {len(_in_flight(requests, fault.at))} requests in flight", flush=True)
            supervisor.paused, supervisor.fault = True, fault
            await fault.inject(platform)
            supervisor.paused = False
            fault.recovery_s = await _next_delivery_after(requests, fault.at)
            print(f"{fault.name}: an image delivered {fault.recovery_s:.1f} s after it", flush=True)
        # 3. Every request to its end (or its deadline).
        for _ in range(CONCURRENT):
            released.put_nowait(None)
        await asyncio.wait_for(loop, REQUEST_DEADLINE_S + 60)
    except BaseException:
        _print_logs(platform)
        raise
    finally:
        loop.cancel()
        supervising.cancel()
    took_s = time.monotonic() - started
    for fault in live:
        fault.in_flight = _in_flight(requests, fault.at)

    # 4. The records: outcomes, the quota log, the images, the audit.
    nc = await nats.connect(platform.nats_url, **platform.nats_options(ADMIN))
    try:
        found, audit = await _read_records(nc.jetstream(), kiln, platform, requests)
    finally:
        await nc.close()
    _print_report(requests, faults, found, audit, took_s)
    _assert_every_request_ended_once(found, audit, supervisor, requests)


async def _read_records(
    js: nats.js.JetStreamContext, kiln: KilnClient, platform: Platform, requests: list[Request]
) -> tuple[Findings, subprocess.CompletedProcess]:
    """What the records say of each request: its outcomes, the quota log, its image, and
    `kiln audit verify`."""
    found = Findings()
    db = await asyncpg.connect(platform.database_url)
    try:
        await _check_outcomes(js, kiln, requests, found)
        await _check_quota_log(db, requests, found)
        await _check_images(js, requests, found)
    finally:
        await db.close()
    return found, await asyncio.to_thread(_audit_verify, platform)


def _assert_every_request_ended_once(
    found: Findings, audit: subprocess.CompletedProcess, supervisor: Supervisor, requests: list[Request]
) -> None:
    """Kiln's promise: every request delivered, denied, or failed and refunded, once; no
    user over the plan; the log verifies; no service died on its own."""
    assert not supervisor.exits, f"services that exited on their own: {supervisor.exits}"
    assert not found.lost, f"requests that never ended: {sorted(found.lost)}"
    assert not found.duplicated, f"requests that happened twice: {found.duplicated}"
    assert not found.over_granted, f"users granted more than their plan allows today: {found.over_granted}"
    assert not found.unrefunded, f"failed requests never refunded: {sorted(found.unrefunded)}"
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert not found.oddities, found.oddities
    assert all(isinstance(r.outcome, (ImageDelivered, QuotaDenied, RequestFailed)) for r in requests)


def _print_logs(platform: Platform) -> None:
    """The services' and servers' logs, for a run that did not get through its faults."""
    logs = [*sorted(platform.log_dir.glob("*.log")), platform.data_dir / "nats" / "nats-server.log"]
    for log in [log for log in logs if log.exists()]:
        print(f"----- {log.name} (last 40 lines)")
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def _print_report(
    requests: list[Request], faults: list[Fault], found: Findings, audit: subprocess.CompletedProcess, took_s: float
) -> None:
    kinds: dict[str, int] = {}
    for r in requests:
        kind = type(r.outcome).__name__ if r.outcome else "no outcome"
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"\n{len(requests)} requests over {N_USERS} users in {took_s:.0f} s: {kinds}")
    print(f"client retries (bus away): {sum(r.client_retries for r in requests)}")
    header = f"{'fault':<26}{'in flight':>10}{'lost':>6}{'dup':>5}{'over':>6}{'failed':>8}{'recovery s':>12}  crashed"
    print(header)
    print("-" * len(header))
    for fault in faults:
        if fault.skipped:
            print(f"{fault.name:<26}  skipped: {fault.skipped}")
            continue
        ids = {r.request_id for r in fault.in_flight}
        users = {r.user for r in fault.in_flight}
        failed = sum(isinstance(r.outcome, RequestFailed) for r in fault.in_flight)
        recovery = f"{fault.recovery_s:.1f}" if fault.recovery_s is not None else "-"
        print(
            f"{fault.name:<26}{len(ids):>10}{len(ids & found.lost):>6}{len(ids & set(found.duplicated)):>5}"
            f"{len(users & set(found.over_granted)):>6}{failed:>8}{recovery:>12}  {', '.join(fault.crashed) or '-'}"
        )
    print(f"audit verify: {audit.stdout.strip()} {audit.stderr.strip()}".strip())
    for oddity in found.oddities:
        print(f"oddity: {oddity}")
