"""Settings: every `KILN_*` variable, read once, here, typed and checked.

Each field of `Settings` names its variable, its default and what it is for; the README's
settings table is made from them (`python -m shared.settings`), and a test keeps the two
in step. A value that does not parse is refused with one line that names the variable
(`SettingsError`). Defaults work on a developer's machine; the launcher (`kiln up`) sets
the variables of its child processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shared.events import MAX_SIDE, MAX_STEPS

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Where `make run` puts its embedded servers: not the standard ports, so that they never
# collide with a NATS or PostgreSQL already running on the machine.
EMBEDDED_NATS_PORT = 14222
EMBEDDED_POSTGRES_PORT = 15432
DEFAULT_HTTP_PORT = 8480
DEFAULT_TRACING_PORT = 6006  # Phoenix, the tracing UI
# Each service's Prometheus endpoint under `make run`.
SERVICES = ("quota", "context", "render", "delivery")  # Kiln's services, in start order
DEFAULT_METRICS_PORTS = {"quota": 9461, "context": 9462, "render": 9463, "delivery": 9464}
# Kiln's own model, trained by services/render/kiln_model/train.py and shipped in the repo.
DEFAULT_MODEL = PROJECT_ROOT / "services" / "render" / "models" / "kiln-shapes"
MIN_LINK_SECRET_CHARS = 32


class SettingsError(ValueError):
    """A `KILN_*` variable holds a value Kiln cannot use; the message names it."""


# -- parsers: text → value, or ValueError saying what was expected -----------------------


def _text(value: str) -> str:
    return value


def _path(value: str) -> Path:
    return Path(value).expanduser()


def _integer(low: int, high: int = 65535 * 1000) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"must be an integer from {low} to {high}") from None
        if not low <= number <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return number

    return parse


def _number(low: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"must be a number of at least {low:g}") from None
        if not number >= low:  # also refuses nan
            raise ValueError(f"must be at least {low:g}")
        return number

    return parse


def _shares(value: str) -> tuple[tuple[str, int], ...]:
    shares: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        plan, _, count = item.partition("=")
        if not plan.strip() or not count.strip().isdigit() or not 1 <= int(count) <= 1000:
            raise ValueError(f"{item!r} is not plan=n with n in 1..1000")
        shares[plan.strip()] = int(count)
    return tuple(shares.items())


def _port(value: str) -> int:
    return _integer(1, 65535)(value)


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise ValueError("must be on or off")
    return value == "on"


def _nats_url(value: str) -> str:
    # A cluster's servers may be listed, comma-separated (shared.bus.nats_servers).
    if not all(part.strip().startswith(("nats://", "tls://", "ws://", "wss://")) for part in value.split(",")):
        raise ValueError("must be a nats:// (or tls://, ws://, wss://) URL, or several, comma-separated")
    return value


def _cluster_size(value: str) -> int:
    # Even sizes add a node without adding a node that may fail: 2 of 2 is the quorum.
    if value not in ("1", "3", "5"):
        raise ValueError("must be 1, 3 or 5")
    return int(value)


POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


def _database_url(value: str) -> str:
    """Any of the forms people paste, kept as the plain `postgresql://` form."""
    for scheme in POSTGRES_SCHEMES:
        if value.startswith(scheme):
            return "postgresql://" + value[len(scheme) :]
    raise ValueError(f"must start with {', '.join(POSTGRES_SCHEMES)}")


# The database roles the quota migrations create (services/quota/migrations/versions/0003).
QUOTA_ROLE = "kiln_quota"
AUDITOR_ROLE = "kiln_auditor"


def as_role(database_url: str, role: str) -> str:
    """The same server and database as `database_url`, as `role`, with no password (the
    owner's is not the role's: give the role's own in its KILN_*_DATABASE_URL)."""
    parts = urlsplit(_database_url(database_url))
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


def hide_password(database_url: str) -> str:
    """A database URL fit to print or log: its password, if any, replaced by ***."""
    parts = urlsplit(database_url)
    user, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in user:
        return database_url
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}"))


def _link_secret(value: str) -> str:
    if len(value) < MIN_LINK_SECRET_CHARS:
        raise ValueError(f"must be at least {MIN_LINK_SECRET_CHARS} characters")
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _issuer(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be an issuer's https:// URL (its /.well-known/openid-configuration is read)")
    return value


def setting(variable: str, default: Any, doc: str, parse: Callable[[str], Any] = _text, shown: str = "") -> Any:
    """A field of `Settings`, read from `variable`. `shown`: the default as the README says
    it, where the value itself would mislead (a path on this machine, a derived default)."""
    return field(default=default, metadata={"variable": variable, "parse": parse, "doc": doc, "shown": shown})


@dataclass(frozen=True)
class Settings:
    # -- servers
    nats_url: str | None = setting(
        "KILN_NATS_URL",
        None,
        "NATS to join (NATS ≥ 2.9 with JetStream); unset: the embedded server",
        _nats_url,
        shown="embedded",
    )
    stream_replicas: int = setting(
        "KILN_STREAM_REPLICAS",
        1,
        "copies of each stream and bucket Kiln creates: 3 on a 3-node NATS cluster (every server with `sync_interval: always`)",
        _integer(1, 5),
    )
    database_url: str | None = setting(
        "KILN_DATABASE_URL",
        None,
        "PostgreSQL ≥ 15 to use: `postgresql://`, `postgres://` or `postgresql+asyncpg://`; unset: the embedded server",
        _database_url,
        shown="embedded",
    )
    quota_database_url: str | None = setting(
        "KILN_QUOTA_DATABASE_URL",
        None,
        "how the quota service connects: as `kiln_quota`, which may only read and append the log",
        _database_url,
        shown="KILN_DATABASE_URL as `kiln_quota`",
    )
    audit_database_url: str | None = setting(
        "KILN_AUDIT_DATABASE_URL",
        None,
        "how `kiln audit` connects: as `kiln_auditor`, which may only read",
        _database_url,
        shown="KILN_DATABASE_URL as `kiln_auditor`",
    )
    nats_port: int = setting("KILN_NATS_PORT", EMBEDDED_NATS_PORT, "the embedded NATS's port", _port)
    nats_cluster: int = setting(
        "KILN_NATS_CLUSTER",
        1,
        "embedded nats-servers `kiln up` runs as one JetStream cluster (3: R3 streams that ride out a lost node; ports from KILN_NATS_PORT up)",
        _cluster_size,
    )
    nats_auth: bool = setting(
        "KILN_NATS_AUTH",
        True,
        "`off`: NATS without authentication, where anyone who reaches it may do anything (said loudly at start)",
        _on_off,
        shown="on",
    )
    nats_creds: Path | None = setting(
        "KILN_NATS_CREDS",
        None,
        "the NATS credential (`.creds`) to connect with; `kiln up` gives each service its own",
        _path,
        shown="none (the CLI mints one where Kiln's keys are)",
    )
    postgres_port: int = setting("KILN_POSTGRES_PORT", EMBEDDED_POSTGRES_PORT, "the embedded PostgreSQL's port", _port)
    data_dir: Path = setting(
        "KILN_DATA_DIR",
        PROJECT_ROOT / ".kiln",
        "the embedded servers' data, logs, the link key",
        _path,
        shown="`.kiln`",
    )
    # -- HTTP (delivery)
    http_host: str = setting("KILN_HTTP_HOST", "127.0.0.1", "where delivery's HTTP server listens")
    http_port: int = setting(
        "KILN_HTTP_PORT", DEFAULT_HTTP_PORT, "delivery's HTTP port: images, share pages, playground", _port
    )
    public_url: str | None = setting(
        "KILN_PUBLIC_URL",
        None,
        "the base of image and share links",
        _optional_text,
        shown="`http://<KILN_HTTP_HOST>:<KILN_HTTP_PORT>`",
    )
    link_secret: str | None = setting(
        "KILN_LINK_SECRET",
        None,
        "the key that signs links and sign-in cookies (≥ 32 characters; every delivery replica must share it)",
        _link_secret,
        shown="made once, kept in `<data>/delivery/link-secret`",
    )
    link_ttl_s: int = setting("KILN_LINK_TTL_S", 24 * 3600, "how long a download link works, in seconds", _integer(1))
    share_ttl_s: int = setting(
        "KILN_SHARE_TTL_S", 7 * 24 * 3600, "how long a share link works, in seconds", _integer(1)
    )
    oidc_issuer: str | None = setting(
        "KILN_OIDC_ISSUER",
        None,
        "an OpenID Connect issuer the playground also signs in with (unset: passwords only)",
        _issuer,
        shown="none",
    )
    oidc_client_id: str | None = setting(
        "KILN_OIDC_CLIENT_ID", None, "the playground's client id at that issuer", _optional_text, shown="none"
    )
    oidc_client_secret: str | None = setting(
        "KILN_OIDC_CLIENT_SECRET",
        None,
        "its client secret, if the issuer gave one (unset: a public client, PKCE only)",
        _optional_text,
        shown="none",
    )
    # -- tracing and metrics
    otlp_endpoint: str | None = setting(
        "KILN_OTLP_ENDPOINT",
        None,
        "export traces over OTLP/HTTP here instead of Phoenix; empty: trace nothing",
        _optional_text,
        shown="the running platform's Phoenix",
    )
    trace_url: str | None = setting(
        "KILN_TRACE_URL",
        None,
        "a tracing UI's page for one trace, with `{trace_id}` in it",
        _optional_text,
        shown="the running platform's Phoenix",
    )
    tracing_ui: bool = setting("KILN_TRACING_UI", True, "`off`: `kiln up` starts no Phoenix", _on_off, shown="on")
    tracing_port: int = setting("KILN_TRACING_PORT", DEFAULT_TRACING_PORT, "Phoenix's port", _port)
    metrics_port: int | None = setting(
        "KILN_METRICS_PORT",
        None,
        "where a service serves its Prometheus metrics",
        _port,
        shown="none (`kiln up`: 9461–9464)",
    )
    metrics_host: str = setting("KILN_METRICS_HOST", "127.0.0.1", "the metrics endpoint's address")
    # -- quota
    plans_file: Path = setting(
        "KILN_PLANS",
        PROJECT_ROOT / "services" / "quota" / "plans.toml",
        "the plans and load-shedding rules",
        _path,
        shown="`services/quota/plans.toml`",
    )
    quota_batch: int = setting(
        "KILN_QUOTA_BATCH", 256, "prompts decided in one transaction, at most", _integer(1, 10_000)
    )
    quota_partitions: int = setting(
        "KILN_QUOTA_PARTITIONS",
        1,
        "hash chains the quota log is split into, by user, each with its own lock (16 for several quota processes"
        " on a shared PostgreSQL); set when migrating, grows only",
        _integer(1, 256),
    )
    checkpoint_every: int = setting(
        "KILN_CHECKPOINT_EVERY",
        1000,
        "quota signs a checkpoint of its log's head every this many events",
        _integer(1, 10**9),
    )
    checkpoint_after_s: float = setting(
        "KILN_CHECKPOINT_AFTER_S",
        10.0,
        "… and otherwise at most this long after an event, in seconds (it looks once a second)",
        _number(1),
    )
    # -- context
    context_config: Path = setting(
        "KILN_CONTEXT_CONFIG",
        PROJECT_ROOT / "services" / "context" / "context.toml",
        "context's limits, blocklist and styles",
        _path,
        shown="`services/context/context.toml`",
    )
    # -- render
    model_path: Path = setting(
        "KILN_MODEL",
        DEFAULT_MODEL,
        "a local diffusers pipeline folder",
        _path,
        shown="Kiln's own model, `services/render/models/kiln-shapes`",
    )
    render_max_batch: int = setting("KILN_RENDER_MAX_BATCH", 16, "jobs per pipeline call, at most", _integer(1, 1024))
    render_max_wait_ms: float = setting(
        "KILN_RENDER_MAX_WAIT_MS", 50.0, "how long a batch may wait to fill, in ms", _number(0)
    )
    render_ack_wait_s: float = setting(
        "KILN_RENDER_ACK_WAIT_S", 30.0, "a silent worker's jobs go to another after this, in seconds", _number(1)
    )
    render_workers: int = setting(
        "KILN_RENDER_WORKERS", 1, "render worker processes `kiln up` runs on this host", _integer(1, 64)
    )
    render_queue_window: int = setting(
        "KILN_RENDER_QUEUE_WINDOW",
        4096,
        "jobs per tier the dispatcher holds and orders fairly; users beyond wait in arrival order",
        _integer(16, 1_000_000),
    )
    render_shares: tuple[tuple[str, int], ...] = setting(
        "KILN_RENDER_SHARES",
        (("pro", 4), ("plus", 2)),
        "jobs a user of each plan takes per turn in the fair queue (`plan=n,…`; other plans 1)",
        _shares,
        shown="`pro=4,plus=2`",
    )
    render_max_side: int = setting(
        "KILN_RENDER_MAX_SIDE",
        MAX_SIDE,
        "the widest or tallest job a worker takes, pixels (re-checked per job)",
        _integer(8, 4096),
    )
    render_max_steps: int = setting(
        "KILN_RENDER_MAX_STEPS",
        MAX_STEPS,
        "the most steps a worker takes in a job (re-checked per job)",
        _integer(1, 1000),
    )
    render_threads: int | None = setting(
        "KILN_RENDER_THREADS",
        None,
        "torch threads of a CPU worker (set it when several share a host)",
        _integer(1, 1024),
        shown="torch's own",
    )
    gpu_hot_c: float = setting("KILN_GPU_HOT_C", 80.0, "the thermal guard halves batches from here, °C", _number(0))
    gpu_pause_c: float = setting(
        "KILN_GPU_PAUSE_C", 87.0, "the thermal guard takes no new jobs from here, °C", _number(0)
    )
    gpu_resume_c: float = setting(
        "KILN_GPU_RESUME_C", 75.0, "a paused worker takes jobs again below this, °C", _number(0)
    )
    inject_gpu_temperature: Path | None = setting(
        "KILN_INJECT_GPU_TEMPERATURE",
        None,
        "a file holding a temperature that replaces the NVML reading (tests, fire drills)",
        _path,
        shown="none",
    )
    # -- tests and drills
    failpoint: str | None = setting(
        "KILN_FAILPOINT",
        None,
        "a named place where the service fails on purpose (`name` or `name:raise`)",
        _optional_text,
        shown="none",
    )
    chromium: Path = setting(
        "KILN_CHROMIUM",
        Path("/usr/bin/chromium"),
        "the browser the playground test drives",
        _path,
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from the environment (or `env`); raises SettingsError naming the first
        variable that holds a value Kiln cannot use."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            variable, parse = spec.metadata["variable"], spec.metadata["parse"]
            raw = env.get(variable)
            if raw is None or (raw == "" and variable != "KILN_OTLP_ENDPOINT"):
                continue  # unset (or empty): the default
            try:
                values[spec.name] = parse(raw.strip())
            except ValueError as error:
                raise SettingsError(f"{variable} {error} but is {raw!r}") from None
        settings = cls(**values)
        if not settings.gpu_resume_c < settings.gpu_pause_c:
            raise SettingsError(
                f"KILN_GPU_RESUME_C ({settings.gpu_resume_c:g}) must be below KILN_GPU_PAUSE_C ({settings.gpu_pause_c:g})"
            )
        if settings.oidc_issuer and not settings.oidc_client_id:
            raise SettingsError("KILN_OIDC_ISSUER is set, so KILN_OIDC_CLIENT_ID must be too")
        if "KILN_OTLP_ENDPOINT" not in env:
            # Unset: as the running platform says; set (even empty, which is "off"): as set.
            saved = TracingInfo.load(settings.data_dir)
            settings = dataclasses.replace(
                settings, otlp_endpoint=saved.otlp_endpoint, trace_url=settings.trace_url or saved.trace_url
            )
        return settings

    @property
    def nats_address(self) -> str:
        """The NATS to connect to: the configured one, else the embedded server (or cluster)."""
        return self.nats_url or ",".join(f"nats://127.0.0.1:{self.nats_port + n}" for n in range(self.nats_cluster))

    @property
    def database_address(self) -> str:
        """The PostgreSQL to connect to: the configured one, else the embedded server."""
        return self.database_url or f"postgresql://postgres@127.0.0.1:{self.postgres_port}/kiln"

    @property
    def quota_database_address(self) -> str:
        """Where the quota service connects, as a role that may only read and append the log."""
        return self.quota_database_url or as_role(self.database_address, QUOTA_ROLE)

    @property
    def audit_database_address(self) -> str:
        """Where `kiln audit` reads the log, as a role that may only read."""
        return self.audit_database_url or as_role(self.database_address, AUDITOR_ROLE)

    @property
    def base_url(self) -> str:
        """The base of the links delivery hands out."""
        return (self.public_url or f"http://{self.http_host}:{self.http_port}").rstrip("/")

    def trace_link(self, trace_id: str) -> str | None:
        """Where the tracing UI shows this trace, if one is configured."""
        return self.trace_url.replace("{trace_id}", trace_id) if self.trace_url else None


@dataclass(frozen=True)
class TracingInfo:
    """Where a running `kiln up` sends traces, kept in its data folder so that a `kiln`
    command in another terminal joins the same traces without being told."""

    otlp_endpoint: str | None
    trace_url: str | None

    FILE = "run/tracing.json"

    def save(self, data_dir: Path) -> None:
        path = data_dir / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"otlp_endpoint": self.otlp_endpoint, "trace_url": self.trace_url}))

    @classmethod
    def load(cls, data_dir: Path) -> TracingInfo:
        try:
            saved = json.loads((data_dir / cls.FILE).read_text())
        except (OSError, ValueError):
            return cls(None, None)
        return cls(saved.get("otlp_endpoint"), saved.get("trace_url"))


def asyncpg_url(database_url: str) -> str:
    """SQLAlchemy needs the driver named in the URL; settings keep the plain form."""
    return "postgresql+asyncpg://" + _database_url(database_url).removeprefix("postgresql://")


def markdown_table() -> str:
    """The README's settings table, made from the fields above."""
    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for spec in dataclasses.fields(Settings):
        shown = spec.metadata["shown"] or f"`{spec.default}`"
        rows.append(f"| `{spec.metadata['variable']}` | {shown} | {spec.metadata['doc']} |")
    return "\n".join(rows)


README_TABLE = re.compile(r"(<!-- settings: [^\n]*-->\n)(.*?)(<!-- /settings -->)", re.S)


def write_readme_table(readme: Path = PROJECT_ROOT / "README.md") -> None:
    """Put the table in the README, between its two markers."""
    text = readme.read_text()
    readme.write_text(README_TABLE.sub(lambda m: m.group(1) + markdown_table() + "\n" + m.group(3), text))


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        write_readme_table()
    else:
        sys.stdout.write(markdown_table() + "\n")
