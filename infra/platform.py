"""The whole platform on one machine: servers (embedded unless external URLs are given),
migrations, and the four services as child processes.

Used by `kiln up` (`make run`) and by the integration tests, so the tests exercise exactly
what an operator starts.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import msgspec
import nats
import nats.errors
import nats.js.errors
import psutil
from opentelemetry import trace

from infra.databases import create_database, drop_database
from infra.embedded import EmbeddedNats, EmbeddedPostgres, ServerError, die_with, free_port, stop_pid
from infra.nats_auth import (
    ADMIN,
    ADMIN_ACCESS,
    ADMIN_PERMISSIONS,
    NO_AUTH_WARNING,
    Authority,
    credentials_file,
    declarations,
    service_permissions,
    write_private,
)
from infra.nats_cluster import EmbeddedNatsCluster, NodePorts
from infra.tracing_ui import Phoenix
from services.quota.migrate import upgrade
from shared import subjects
from shared.access import Access, credential_options
from shared.bus import Bus, nats_servers
from shared.settings import (
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORTS,
    DEFAULT_MODEL,
    DEFAULT_TRACING_PORT,
    EMBEDDED_NATS_PORT,
    EMBEDDED_POSTGRES_PORT,
    PROJECT_ROOT,
    QUOTA_ROLE,
    SERVICES,
    Settings,
    TracingInfo,
    as_role,
    hide_password,
)
from shared.telemetry import USER_REF_KEY_FILE

CLUSTER_REPLICAS = 3  # copies of each stream on an embedded cluster

# The durable consumer each service pulls from: it has pull requests waiting once the
# service is up and serving. Render takes its jobs through the fair queue instead: it is
# ready once it sends heartbeats.
CONSUMERS = {
    "quota": (subjects.PROMPTS.name, subjects.DURABLE_QUOTA_PROMPTS),
    "context": (subjects.QUOTA.name, subjects.DURABLE_CONTEXT),
    "delivery": (subjects.RENDER_EVENTS.name, subjects.DURABLE_DELIVERY),
}


@dataclass
class Platform:
    data_dir: Path
    nats_url: str | None = None  # external servers; None starts the embedded one
    # Every connection authenticated, with the permissions its declaration gives
    # (`infra.nats_auth`); off only when asked, and said loudly.
    nats_auth: bool = True
    database_url: str | None = None
    nats_port: int = EMBEDDED_NATS_PORT
    # Embedded nats-servers: 1, or a JetStream cluster of 3 (or 5) whose streams are R3.
    nats_cluster: int = 1
    postgres_port: int = EMBEDDED_POSTGRES_PORT
    http_port: int = DEFAULT_HTTP_PORT
    model_path: Path = DEFAULT_MODEL
    # Traces go to this OTLP endpoint; None starts Phoenix (if installed, and `tracing_ui`).
    otlp_endpoint: str | None = None
    trace_url: str | None = None
    tracing_ui: bool = True
    tracing_port: int = DEFAULT_TRACING_PORT
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    # A throwaway platform's embedded PostgreSQL data is deleted when it stops (as root it
    # lives outside the data folder, in /var/lib/kiln/data: see infra/embedded.py).
    throwaway: bool = False
    services: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)
    # instance → (service, its extra env): how to start it again (a rolling restart)
    started_as: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict, init=False)
    _nats: EmbeddedNats | EmbeddedNatsCluster | None = field(default=None, init=False, repr=False)
    _postgres: EmbeddedPostgres | None = field(default=None, init=False, repr=False)
    _phoenix: Phoenix | None = field(default=None, init=False, repr=False)
    _lock: TextIO | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Platform:
        """The platform `make run` starts, as the KILN_* variables configure it."""
        return cls(
            data_dir=settings.data_dir,
            nats_url=settings.nats_url,
            nats_auth=settings.nats_auth,
            database_url=settings.database_url,
            nats_port=settings.nats_port,
            nats_cluster=settings.nats_cluster,
            postgres_port=settings.postgres_port,
            http_port=settings.http_port,
            model_path=settings.model_path,
            otlp_endpoint=settings.otlp_endpoint,
            trace_url=settings.trace_url,
            tracing_ui=settings.tracing_ui,
            tracing_port=settings.tracing_port,
        )

    @classmethod
    def isolated(
        cls, data_dir: Path, model_path: Path, settings: Settings | None = None, *, tracing_ui: bool = True
    ) -> Platform:
        """A platform that shares nothing with `make run`: its own data folder and free
        ports, joining external servers only where KILN_NATS_URL / KILN_DATABASE_URL say.
        Its embedded PostgreSQL's data goes when it stops. `tracing_ui=False`: no Phoenix
        (benchmarks: Phoenix and recorded spans take CPU from what they measure)."""
        settings = settings or Settings.from_env()
        return cls(
            data_dir=data_dir,
            nats_url=settings.nats_url,
            nats_auth=settings.nats_auth,
            database_url=settings.database_url,
            nats_port=free_port(),
            nats_cluster=settings.nats_cluster,
            postgres_port=free_port(),
            http_port=free_port(),
            model_path=model_path,
            otlp_endpoint=settings.otlp_endpoint,
            trace_url=settings.trace_url,
            tracing_port=free_port(),
            metrics_ports={name: free_port() for name in SERVICES},
            throwaway=True,
            tracing_ui=tracing_ui,
        )

    @property
    def embedded_postgres(self) -> EmbeddedPostgres | None:
        return self._postgres

    @property
    def embedded_nats_cluster(self) -> EmbeddedNatsCluster | None:
        return self._nats if isinstance(self._nats, EmbeddedNatsCluster) else None

    @property
    def stream_replicas(self) -> int:
        """R3 on our own cluster (a node may die, a majority stays); else as configured."""
        return CLUSTER_REPLICAS if self.embedded_nats_cluster else Settings.from_env().stream_replicas

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    # -- servers --------------------------------------------------------------------------

    def start_servers(self) -> None:
        self._take_lock()
        if self.otlp_endpoint is None and self.tracing_ui and Phoenix.installed():
            # Started first and waited for last: it takes the longest to come up.
            self._phoenix = Phoenix(self.data_dir / "phoenix", self.tracing_port)
            try:
                self._phoenix.start()
            except ServerError as error:
                self._no_tracing_ui(error)
        self._make_user_ref_key()
        if self.nats_auth:
            self._write_credentials()
        else:
            print(NO_AUTH_WARNING)
        if self.nats_url is None:
            # Kept before starting, so that `stop` stops it even if starting is interrupted.
            auth = Authority.open(self.data_dir).server_config() if self.nats_auth else ""
            self._nats = self._embedded_nats(auth)
            self.nats_url = self._nats.start()
        if self.database_url is None:
            self._postgres = EmbeddedPostgres(self.data_dir / "postgres" / "data", self.postgres_port)
            self.database_url = self._postgres.start()
        if self._phoenix is not None:
            try:
                self._phoenix.wait()
                self.otlp_endpoint, self.trace_url = self._phoenix.url, self._phoenix.trace_url
            except ServerError as error:
                self._no_tracing_ui(error)
        TracingInfo(self.otlp_endpoint, self.trace_url).save(self.data_dir)  # for the CLI

    def _embedded_nats(self, auth: str) -> EmbeddedNats | EmbeddedNatsCluster:
        if self.nats_cluster == 1:
            return EmbeddedNats(self.data_dir / "nats", self.nats_port, auth)
        # A throwaway platform's nodes take free ports, as its other servers do.
        size = self.nats_cluster
        ports = NodePorts.free(size) if self.throwaway else NodePorts.counting_from(self.nats_port, size)
        return EmbeddedNatsCluster(self.data_dir / "nats", ports, auth)

    def _no_tracing_ui(self, error: ServerError) -> None:
        """The tracing UI is a help, not a part: without it Kiln runs, untraced."""
        print(f"the tracing UI did not start ({error}); running without traces")
        self._phoenix = None

    def stop_servers(self) -> None:
        if self._lock is None:
            return  # never started (a second launcher refused): the folder is another's
        (self.data_dir / TracingInfo.FILE).unlink(missing_ok=True)
        if self._phoenix is not None:
            self._phoenix.stop()
        if self._postgres is not None:
            if self.throwaway:
                self._postgres.remove_data()
            else:
                self._postgres.stop()
        if self._nats is not None:
            self._nats.stop()
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _take_lock(self) -> None:
        """One launcher per data folder: a second would take the first's processes for
        orphans and stop them."""
        run_dir = self.data_dir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / "platform.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise RuntimeError(f"another Kiln (pid {holder}) is running on {self.data_dir}; stop it first") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    # -- services -------------------------------------------------------------------------

    # -- who may do what on the bus ---------------------------------------------------------

    def credentials(self, identity: str) -> Path | None:
        """The credential this platform gave `identity` (a service, or ADMIN), if auth is on."""
        return credentials_file(self.data_dir, identity) if self.nats_auth else None

    def nats_options(self, identity: str) -> dict[str, Any]:
        """nats-py's connect options for `identity`: its credential and its own inbox."""
        return credential_options(self.credentials(identity), identity)

    async def bus(self, identity: str = ADMIN, access: Access = ADMIN_ACCESS) -> Bus:
        """A bus connection as `identity` (by default the admin, which may do anything): for
        the launcher, the tests and the benchmarks."""
        assert self.nats_url
        tracer = trace.get_tracer("kiln.platform")
        try:
            # No reconnecting: a server that refuses the credential would be asked forever.
            return await Bus.connect(
                self.nats_url, identity, tracer, access, self.credentials(identity),
                allow_reconnect=False, connect_timeout=5,
            )  # fmt: skip
        except (OSError, TimeoutError, nats.errors.Error) as error:
            hint = (
                "; does it trust Kiln's operator (`kiln accounts nats-config`), or is it a NATS without "
                "authentication (KILN_NATS_AUTH=off)?"
                if self.nats_auth
                else ""
            )
            raise ServerError(f"cannot connect to NATS at {self.nats_url} as {identity} ({error}){hint}") from None

    async def declare(self) -> None:
        """Kiln's streams and buckets, made or brought up to date by the admin: with auth
        on, no service may change them."""
        bus = await self.bus()
        try:
            await bus.declare(self.stream_replicas)
        finally:
            await bus.close()

    def _write_credentials(self) -> None:
        """A fresh credential for each service (its declaration's permissions) and the admin."""
        authority = Authority.open(self.data_dir)
        for name, access in declarations().items():
            authority.write_credentials(self.credentials(name), name, service_permissions(name, access))
        authority.write_credentials(self.credentials(ADMIN), ADMIN, ADMIN_PERMISSIONS)

    def _make_user_ref_key(self) -> None:
        """The key user ids are hashed with in traces (shared.telemetry.user_ref): made once,
        so a user's refs stay the same across restarts."""
        path = self.data_dir / USER_REF_KEY_FILE
        if not path.exists():
            write_private(path, secrets.token_bytes(32))

    def _database_env(self, service: str) -> dict[str, str]:
        """The database as each service may use it: quota as `kiln_quota` (read and append
        the log), the others not at all. The owner's URL (migrations) stays here."""
        assert self.database_url
        if service != "quota":
            return {"KILN_DATABASE_URL": "", "KILN_QUOTA_DATABASE_URL": "", "KILN_AUDIT_DATABASE_URL": ""}
        quota_url = Settings.from_env().quota_database_url or as_role(self.database_url, QUOTA_ROLE)
        return {"KILN_DATABASE_URL": quota_url, "KILN_QUOTA_DATABASE_URL": quota_url}

    def _credentials_env(self, service: str) -> dict[str, str]:
        credentials = self.credentials(service)
        return {"KILN_NATS_CREDS": str(credentials)} if credentials else {}

    def service_env(self) -> dict[str, str]:
        assert self.nats_url and self.database_url and self.model_path
        return {
            **os.environ,
            "KILN_NATS_URL": self.nats_url,
            "KILN_STREAM_REPLICAS": str(self.stream_replicas),
            "KILN_NATS_AUTH": "on" if self.nats_auth else "off",
            "KILN_DATABASE_URL": self.database_url,
            "KILN_MODEL": str(self.model_path),
            "KILN_DATA_DIR": str(self.data_dir),
            "KILN_HTTP_PORT": str(self.http_port),
            "KILN_OTLP_ENDPOINT": self.otlp_endpoint or "",
            "KILN_TRACE_URL": self.trace_url or "",
            "PYTHONUNBUFFERED": "1",
        }

    def start_service(
        self, name: str, *, instance: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start `python -m services.<name>`. `instance` names an extra process of the same
        service (e.g. "quota-2"); `env` adds variables for this process only."""
        instance = instance or name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.data_dir / "run" / f"{instance}.pid"
        pid_file.parent.mkdir(exist_ok=True)
        if pid_file.exists() and self._stop_orphaned_service(name, int(pid_file.read_text())):
            print(f"stopped an orphaned {instance} service left by an earlier run")
        with open(self.log_dir / f"{instance}.log", "ab") as log:
            # The service's metrics port belongs to its usual process; extra instances
            # serve none unless `env` gives them one.
            metrics_port = str(self.metrics_ports.get(name, "")) if instance == name else ""
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                cwd=PROJECT_ROOT,
                env=self.service_env()
                | self._credentials_env(name)
                | self._database_env(name)
                | {"KILN_METRICS_PORT": metrics_port}
                | (env or {}),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops us in order
                preexec_fn=die_with(os.getpid()),
            )
        pid_file.write_text(str(process.pid))
        self.services[instance] = process
        self.started_as[instance] = (name, env or {})
        return process

    def start_services(self) -> None:
        for name in SERVICES:
            self.start_service(name)
        for n in range(2, Settings.from_env().render_workers + 1):
            self.start_service("render", instance=f"render-{n}")

    def instances(self, name: str) -> list[str]:
        """The running processes of service `name` (its usual one and any extra)."""
        return [
            instance
            for instance, (service, _) in self.started_as.items()
            if service == name and instance in self.services
        ]

    async def roll(self, name: str, grace_s: float = 120, ready_s: float = 120) -> list[tuple[str, int | None]]:
        """Replace the processes of `name` one at a time, as a rolling update does: SIGTERM
        (the process finishes what it holds and exits), start it again, wait until it is
        ready, then the next. Returns each process's exit code."""
        exits = []
        for instance in self.instances(name):
            service, env = self.started_as[instance]
            code = await asyncio.to_thread(self.stop_service, instance, signal.SIGTERM, grace_s)
            exits.append((instance, code))
            process = self.start_service(service, instance=instance, env=env)
            await self._wait_started(service, instance, process.pid, ready_s)
        return exits

    async def _wait_started(self, service: str, instance: str, pid: int, timeout_s: float) -> None:
        """Until the new process serves (`_serving`)."""
        nc = await nats.connect(nats_servers(self.nats_url), **self.nats_options(ADMIN))
        heartbeats = await nc.subscribe(subjects.FLEET_TELEMETRY.pattern)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive(instance)
                if await self._serving(nc.jetstream(), heartbeats, service, pid):
                    return
                await asyncio.sleep(0.2)
            raise TimeoutError(f"{instance} not ready after {timeout_s:.0f}s; see {self.log_dir / (instance + '.log')}")
        finally:
            await nc.close()

    def _stop_orphaned_service(self, name: str, pid: int) -> bool:
        """A service of ours is `python -m services.<name>` run with our data folder."""
        try:
            ours = psutil.Process(pid).environ().get("KILN_DATA_DIR") == str(self.data_dir)
        except psutil.Error:
            return False
        return ours and stop_pid(pid, f"services.{name}")

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int | None:
        process = self.services.pop(name, None)
        (self.data_dir / "run" / f"{name}.pid").unlink(missing_ok=True)
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def stop_services(self) -> None:
        for name in reversed(list(self.services)):
            self.stop_service(name)

    async def wait_ready(self, timeout_s: float = 120) -> None:
        """Wait until every service is pulling from its consumer and delivery answers HTTP."""
        deadline = time.monotonic() + timeout_s
        nc = await nats.connect(nats_servers(self.nats_url), **self.nats_options(ADMIN))
        heartbeats = await nc.subscribe(subjects.FLEET_TELEMETRY.pattern)
        try:
            js = nc.jetstream()
            waiting = set(SERVICES)
            while waiting:
                for name in list(waiting):
                    self._check_alive(name)
                    if await self._serving(js, heartbeats, name, self.services[name].pid):
                        waiting.discard(name)
                if waiting and time.monotonic() > deadline:
                    raise TimeoutError(f"not ready after {timeout_s:.0f}s: {sorted(waiting)}; logs in {self.log_dir}")
                await asyncio.sleep(0.2)
        finally:
            await nc.close()

    async def _serving(self, js: nats.js.JetStreamContext, heartbeats, service: str, pid: int) -> bool:
        """Whether a service's process serves: a render worker sends heartbeats; another
        service's consumer has pull requests waiting, and delivery answers HTTP."""
        if service == "render":
            return await self._render_beating(heartbeats, pid)
        stream, durable = CONSUMERS[service]
        try:
            info = await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            return False  # on a cluster, a consumer just made answers once its leader is elected
        return bool(info.num_waiting) and (service != "delivery" or await self._http_ok())

    @staticmethod
    async def _render_beating(heartbeats, pid: int) -> bool:
        """A heartbeat from the render process `pid` (worker ids end in the pid), not from
        another worker on a shared NATS."""
        while True:
            try:
                msg = await heartbeats.next_msg(timeout=0.01)
            except nats.errors.TimeoutError:
                return False
            if msgspec.json.decode(msg.data).get("worker_id", "").endswith(f"-{pid}"):
                return True

    def _check_alive(self, name: str) -> None:
        process = self.services.get(name)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {self.log_dir / (name + '.log')}")

    async def _http_ok(self) -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{self.http_url}/healthz", timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    # -- all together ---------------------------------------------------------------------

    def describe(self) -> str:
        """Where everything is, for the operator who just ran `kiln up`."""

        def origin(server: object | None) -> str:
            if isinstance(server, EmbeddedNatsCluster):
                return f"  (embedded: a cluster of {len(server.nodes)}, streams R{self.stream_replicas})"
            return "  (embedded)" if server is not None else "  (external)"

        metrics = ", ".join(f"{name} :{port}" for name, port in self.metrics_ports.items())

        return (
            f"  NATS      {self.nats_url}{origin(self._nats)}\n"
            f"  auth      {self._auth()}\n"
            f"  Postgres  {hide_password(self.database_url or '')}{origin(self._postgres)}\n"
            f"  HTTP      {self.http_url}  (the playground, images, share pages, /healthz)\n"
            f"  traces    {self._tracing()}\n"
            f"  metrics   {metrics}\n"
            f"  model     {self.model_path}\n"
            f"  logs      {self.log_dir}/<service>.log"
        )

    def _auth(self) -> str:
        if not self.nats_auth:
            return "OFF (KILN_NATS_AUTH=off): anyone who reaches NATS may do anything"
        return "on: a credential per service; `kiln accounts add-user NAME` gives a user theirs"

    def _tracing(self) -> str:
        if self._phoenix is not None:
            return f"{self._phoenix.url}  (Phoenix, the tracing UI)"
        if self.otlp_endpoint:
            return f"exported over OTLP to {self.otlp_endpoint}"
        if not self.tracing_ui:
            return "off (KILN_TRACING_UI=off)"
        if not Phoenix.installed():
            return "off (install the tracing UI with `make .phoenix/.installed`)"
        return "off (the tracing UI did not start; see its log in the data folder)"

    async def start(self) -> None:
        # On this thread, not a worker thread: children die with the thread that started
        # them (PR_SET_PDEATHSIG), and a worker thread ends before the platform does.
        self.start_servers()
        await self.declare()
        await asyncio.to_thread(upgrade, self.database_url)  # alembic runs its own event loop
        self.start_services()
        await self.wait_ready()

    @asynccontextmanager
    async def running(self, database_prefix: str) -> AsyncIterator[Platform]:
        """Started, and stopped after. On an external PostgreSQL (KILN_DATABASE_URL) it runs
        in a new database of its own, `<database_prefix>_<random>`, dropped after: tests and
        benchmarks never touch the database they were pointed at."""
        external_db, database_name = self.database_url, None
        if external_db:
            self.database_url, database_name = await create_database(external_db, database_prefix)
        try:
            await self.start()
            yield self
        finally:
            self.stop()
            if external_db and database_name:
                await drop_database(external_db, database_name)

    def stop(self) -> None:
        self.stop_services()
        self.stop_servers()
