"""Kiln on a 3-node JetStream cluster (R3 streams) rides out the loss of a node under load.

A closed loop of clients sends N_REQUESTS prompts for N_USERS free users while the node
that leads the prompts stream is SIGKILLed, started again and waited for until it has
caught up; then the node that leads the render jobs stream (or, if that is the node just
restarted, the meta leader) is SIGKILLed and left down until the load has ended.

The records are checked afterwards, as in the fault suite (tests/faults): each request's one
outcome in the KILN_OUTCOMES stream, the quota log in PostgreSQL, the image bucket and
`kiln audit verify`. The cluster is always the embedded one, whatever KILN_NATS_URL says;
PostgreSQL is KILN_DATABASE_URL's if set. -s prints a table per node killed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from opentelemetry import trace

from infra.nats_auth import ADMIN
from infra.nats_cluster import EmbeddedNatsCluster
from infra.platform import Platform
from kiln.client import CLIENT_ACCESS, KilnClient
from shared import subjects
from shared.bus import Bus, nats_servers
from shared.events import RequestFailed
from shared.settings import Settings
from tests.conftest import TEST_PLANS
from tests.faults.test_faults import (
    Findings,
    Request,
    Supervisor,
    _assert_every_request_ended_once,
    _closed_loop,
    _in_flight,
    _next_delivery_after,
    _read_records,
)

pytestmark = pytest.mark.integration

N_USERS = 15
FREE_DAILY_LIMIT = 3  # tests/integration/plans.toml's free plan
EXTRA = 5  # users with one request more than the free plan allows: denied, or the plan broken
N_REQUESTS = N_USERS * FREE_DAILY_LIMIT + EXTRA
CONCURRENT = 6  # clients in the closed loop, each with one request in flight
STEPS = 4  # a short render: the cluster, not the model, is under test
IN_FLIGHT_S = 1.0  # from releasing a share of the requests to the kill: some are mid-way
REQUEST_DEADLINE_S = 150  # a request with no outcome by then is lost
LEADER_WAIT_S = 30


@pytest_asyncio.fixture(scope="module")
async def cluster_platform(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> AsyncIterator[Platform]:
    """Its own platform on an embedded 3-node cluster; no tracing UI (the CPUs are for the load)."""
    os.environ["KILN_PLANS"] = str(TEST_PLANS)  # as the `platform` fixture: free = 3 a day
    settings = dataclasses.replace(Settings.from_env(), nats_url=None, nats_cluster=3)
    stack = Platform.isolated(tmp_path_factory.mktemp("kiln-cluster"), model_path, settings, tracing_ui=False)
    async with stack.running("kiln_test"):
        yield stack


@pytest_asyncio.fixture
async def kiln(cluster_platform: Platform) -> AsyncIterator[KilnClient]:
    """The SDK on a connection that, like a service's, reconnects for ever (to another node)."""
    assert cluster_platform.nats_url
    bus = await Bus.connect(
        cluster_platform.nats_url, ADMIN, trace.get_tracer("kiln.cluster"), CLIENT_ACCESS,
        cluster_platform.credentials(ADMIN), reconnect_time_wait=0.5, connect_timeout=2,
    )  # fmt: skip
    async with KilnClient(bus) as client:
        yield client


@dataclasses.dataclass
class Kill:
    node: int
    why: str  # which leader it was
    at: float = 0.0  # wall clock
    in_flight: list[Request] = dataclasses.field(default_factory=list)
    recovery_s: float | None = None  # to the next delivered image
    caught_up_s: float | None = None  # restarted, until current again


async def _leader(js: nats.js.JetStreamContext, cluster: EmbeddedNatsCluster, stream: str) -> int:
    """The node that leads `stream`; asked again while the cluster is still settling after a
    restart (the API times out, or the stream has no leader yet)."""
    deadline = time.monotonic() + LEADER_WAIT_S
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster and info.cluster.leader:
                return cluster.node_named(info.cluster.leader)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            pass
        assert time.monotonic() < deadline, f"{stream} has no leader after {LEADER_WAIT_S} s"
        await asyncio.sleep(0.5)


async def _kill(cluster: EmbeddedNatsCluster, kill: Kill, requests: list[Request]) -> None:
    clients = ", ".join(await asyncio.to_thread(cluster.clients, kill.node)) or "none"
    kill.at = time.time()
    print(f"SIGKILL kiln-{kill.node} ({kill.why}): {len(_in_flight(requests, kill.at))} requests in flight", flush=True)
    print(f"  its connections: {clients}", flush=True)
    await asyncio.to_thread(cluster.kill, kill.node)
    kill.recovery_s = await _next_delivery_after(requests, kill.at)
    print(f"  an image delivered {kill.recovery_s:.1f} s after it", flush=True)


async def test_no_request_is_lost_or_doubled_while_cluster_nodes_die(cluster_platform: Platform, kiln: KilnClient):
    platform = cluster_platform
    cluster = platform.embedded_nats_cluster
    assert cluster is not None and platform.stream_replicas == 3
    run = uuid.uuid4().hex[:6]
    users = [f"c{run}u{n}" for n in range(N_USERS)]
    # Users interleaved, so each user's requests spread over the kills; the extra ones last.
    requests = [Request(users[n % N_USERS], uuid.uuid4().hex) for n in range(N_REQUESTS)]
    shares = [requests[i::3] for i in range(3)]  # before the first kill, before each kill
    admin = await nats.connect(
        nats_servers(platform.nats_url or ""), name="kiln-test-admin", **platform.nats_options(ADMIN)
    )
    js = admin.jetstream()
    assert (await js.stream_info(subjects.PROMPTS.name)).config.num_replicas == 3
    released: asyncio.Queue[Request | None] = asyncio.Queue()
    loop = asyncio.ensure_future(_closed_loop(kiln, released, CONCURRENT, STEPS, REQUEST_DEADLINE_S))
    supervisor = Supervisor(platform)
    supervising = asyncio.ensure_future(supervisor.run())
    kills: list[Kill] = []
    started = time.monotonic()
    try:
        for request in shares[0]:
            released.put_nowait(request)
        await _next_delivery_after(requests, time.time() - 1)  # the platform serves
        # 1. The prompts stream's leader dies; started again, it must catch up.
        for request in shares[1]:
            released.put_nowait(request)
        await asyncio.sleep(IN_FLIGHT_S)
        first = Kill(await _leader(js, cluster, subjects.PROMPTS.name), "leads KILN_PROMPTS")
        kills.append(first)
        await _kill(cluster, first, requests)
        restarted = time.monotonic()
        await asyncio.to_thread(cluster.restart, first.node)
        first.caught_up_s = time.monotonic() - restarted
        print(f"  kiln-{first.node} restarted and current in {first.caught_up_s:.1f} s", flush=True)
        # 2. Another node dies (the render jobs' leader, else the meta leader) and stays down.
        for request in shares[2]:
            released.put_nowait(request)
        await asyncio.sleep(IN_FLIGHT_S)
        second = Kill(await _leader(js, cluster, subjects.RENDER_JOBS.name), "leads KILN_RENDER_JOBS")
        if second.node == first.node:
            leader = cluster.meta_leader()
            assert leader is not None
            second = Kill(cluster.node_named(leader), "the meta leader")
        if second.node == first.node:
            second = Kill(next(n for n in (1, 2, 3) if n != first.node), "a follower")
        kills.append(second)
        await _kill(cluster, second, requests)
        # 3. Every request to its end (or its deadline).
        for _ in range(CONCURRENT):
            released.put_nowait(None)
        await asyncio.wait_for(loop, REQUEST_DEADLINE_S + 60)
    except BaseException:
        _print_logs(platform, cluster)
        raise
    finally:
        loop.cancel()
        supervising.cancel()
    took_s = time.monotonic() - started
    for kill in kills:
        kill.in_flight = _in_flight(requests, kill.at)

    # 4. The records, read through the two nodes left: outcomes, the quota log, images, audit.
    try:
        found, audit = await _read_records(js, kiln, platform, requests)
    finally:
        await admin.close()
    _print_report(requests, kills, found, audit.stdout + audit.stderr, took_s)
    _assert_every_request_ended_once(found, audit, supervisor, requests)


def _print_logs(platform: Platform, cluster: EmbeddedNatsCluster) -> None:
    logs = [*sorted(platform.log_dir.glob("*.log")), *(node.log for node in cluster.nodes)]
    for log in [log for log in logs if log.exists()]:
        print(f"----- {log} (last 40 lines)")
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))


def _print_report(requests: list[Request], kills: list[Kill], found: Findings, audit: str, took_s: float) -> None:
    kinds: dict[str, int] = {}
    for r in requests:
        kind = type(r.outcome).__name__ if r.outcome else "no outcome"
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"\n{len(requests)} requests over {N_USERS} users in {took_s:.0f} s: {kinds}")
    print(f"client retries (bus away): {sum(r.client_retries for r in requests)}")
    header = (
        f"{'node killed':<34}{'in flight':>10}{'lost':>6}{'dup':>5}{'over':>6}{'failed':>8}{'recovery s':>12}"
        f"{'slowest s':>11}"
    )
    print(header)
    print("-" * len(header))
    for kill in kills:
        ids = {r.request_id for r in kill.in_flight}
        users = {r.user for r in kill.in_flight}
        failed = sum(isinstance(r.outcome, RequestFailed) for r in kill.in_flight)
        recovery = f"{kill.recovery_s:.1f}" if kill.recovery_s is not None else "-"
        # The longest any request in flight took from sent to its outcome.
        slowest = max((r.ended_at - r.sent_at for r in kill.in_flight if r.ended_at and r.sent_at), default=0.0)
        print(
            f"{f'kiln-{kill.node} ({kill.why})':<34}{len(ids):>10}{len(ids & found.lost):>6}"
            f"{len(ids & set(found.duplicated)):>5}{len(users & set(found.over_granted)):>6}{failed:>8}{recovery:>12}"
            f"{slowest:>11.1f}"
        )
    print(f"audit verify: {audit.strip()}")
    for oddity in found.oddities:
        print(f"oddity: {oddity}")
