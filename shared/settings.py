"""Settings from the environment. Every knob is a `KILN_*` variable with a default that
works on a developer's machine; the embedded launcher sets them for its child processes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Where `make run` puts its embedded servers: not the standard ports, so that they never
# collide with a NATS or PostgreSQL already running on the machine.
EMBEDDED_NATS_PORT = 14222
EMBEDDED_POSTGRES_PORT = 15432
DEFAULT_HTTP_PORT = 8480
DEFAULT_TRACING_PORT = 6006  # Phoenix, the tracing UI
# Each service's Prometheus endpoint under `make run`.
DEFAULT_METRICS_PORTS = {"quota": 9461, "context": 9462, "render": 9463, "delivery": 9464}
# Kiln's own model, trained by services/render/kiln_model/train.py and shipped in the repo.
DEFAULT_MODEL = PROJECT_ROOT / "services" / "render" / "models" / "kiln-shapes"


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


@dataclass(frozen=True)
class Settings:
    nats_url: str
    database_url: str
    data_dir: Path
    model_path: Path
    http_host: str
    http_port: int
    public_url: str
    otlp_endpoint: str | None
    trace_url: str | None  # a tracing UI's page for one trace, with `{trace_id}` in it
    metrics_port: int | None  # where this process serves its Prometheus metrics
    metrics_host: str

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        data_dir = Path(env.get("KILN_DATA_DIR", PROJECT_ROOT / ".kiln"))
        http_host = env.get("KILN_HTTP_HOST", "127.0.0.1")
        http_port = int(env.get("KILN_HTTP_PORT", DEFAULT_HTTP_PORT))
        # Unset: as the running platform says; set (even empty, which is "off"): as set.
        tracing = TracingInfo.load(data_dir) if "KILN_OTLP_ENDPOINT" not in env else TracingInfo(None, None)
        return cls(
            nats_url=env.get("KILN_NATS_URL") or f"nats://127.0.0.1:{EMBEDDED_NATS_PORT}",
            database_url=env.get("KILN_DATABASE_URL")
            or f"postgresql://postgres@127.0.0.1:{EMBEDDED_POSTGRES_PORT}/kiln",
            data_dir=data_dir,
            model_path=Path(env.get("KILN_MODEL", DEFAULT_MODEL)),
            http_host=http_host,
            http_port=http_port,
            public_url=env.get("KILN_PUBLIC_URL", f"http://{http_host}:{http_port}").rstrip("/"),
            otlp_endpoint=env.get("KILN_OTLP_ENDPOINT", tracing.otlp_endpoint) or None,
            trace_url=env.get("KILN_TRACE_URL") or tracing.trace_url or None,
            metrics_port=int(env["KILN_METRICS_PORT"]) if env.get("KILN_METRICS_PORT") else None,
            metrics_host=env.get("KILN_METRICS_HOST", "127.0.0.1"),
        )


    def trace_link(self, trace_id: str) -> str | None:
        """Where the tracing UI shows this trace, if one is configured."""
        return self.trace_url.replace("{trace_id}", trace_id) if self.trace_url else None


def asyncpg_url(database_url: str) -> str:
    """SQLAlchemy needs the driver named in the URL; operators write plain postgresql://."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url[len(prefix):]
    raise ValueError(f"KILN_DATABASE_URL must be a postgresql:// URL but is {database_url!r}")
