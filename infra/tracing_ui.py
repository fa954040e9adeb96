"""Arize Phoenix as the tracing UI of `make run` and the tests: it receives OTLP over HTTP
and shows each request's trace.

Phoenix brings about 140 packages and pins its own versions, so it lives in a virtual
environment of its own, `.phoenix` (`make .phoenix/.installed`; `make run` and `make test`
do it). It runs offline (`PHOENIX_ALLOW_EXTERNAL_RESOURCES=false`), on 127.0.0.1 only,
keeping its data in the data folder.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

from infra.embedded import ServerError, die_with, free_port, port_in_use, terminate
from shared.settings import PROJECT_ROOT

PHOENIX = PROJECT_ROOT / ".phoenix" / "bin" / "phoenix"
START_TIMEOUT_S = 90


class Phoenix:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.log = root / "phoenix.log"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def installed() -> bool:
        return PHOENIX.exists()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def trace_url(self) -> str:
        """The UI's page for one trace (`{trace_id}` filled in by Settings.trace_link)."""
        return f"{self.url}/redirects/traces/{{trace_id}}"

    def start(self) -> None:
        """Start Phoenix (`wait` waits until it answers). Its OTLP endpoint is its URL."""
        self.root.mkdir(parents=True, exist_ok=True)
        if port_in_use(self.port):
            raise ServerError(f"port {self.port} is taken; set KILN_TRACING_PORT to another port")
        env = os.environ | {
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(free_port()),  # OTLP over gRPC: unused, kept off the default port
            "PHOENIX_WORKING_DIR": str(self.root),
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(PHOENIX), "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with(os.getpid()),
            )

    def wait(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"Phoenix did not start; see {self.log}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        terminate(self.process, 15)
