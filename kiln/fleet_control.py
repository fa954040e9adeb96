"""`kiln fleet restart SERVICE` asks the running `kiln up` to roll a service's processes.

The launcher owns the processes, so it does the restart; the command only asks, through
files in the data folder's `run/` and a SIGHUP: it writes the service's name to
`fleet-request`, signals the launcher (its pid in `kiln-up.pid`), and waits until the
launcher has replaced the request with its answer in `fleet-result`. One request at a time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.settings import SERVICES


class ControlError(RuntimeError):
    pass


def _run_dir(data_dir: Path) -> Path:
    return data_dir / "run"


class Requests:
    """The launcher's side."""

    def __init__(self, data_dir: Path) -> None:
        self.run = _run_dir(data_dir)
        self.asked = threading.Event()  # set from the SIGHUP handler

    def announce(self) -> None:
        """Say where to send requests: this process."""
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "kiln-up.pid").write_text(str(os.getpid()))

    def retire(self) -> None:
        (self.run / "kiln-up.pid").unlink(missing_ok=True)

    def listen(self) -> None:
        """A request written before the launcher was listening is served too."""
        if (self.run / "fleet-request").exists():
            self.asked.set()

    def serve(self, roll: Callable[[str], list[tuple[str, int | None]]], say: Callable[[str], None]) -> None:
        request = self.run / "fleet-request"
        try:
            service = request.read_text().strip()
        except FileNotFoundError:
            return
        if service not in SERVICES:
            result = f"no service {service!r}; one of {', '.join(SERVICES)}"
        else:
            say(f"restarting {service}, one process at a time …")
            try:
                exits = roll(service)
                result = f"restarted {service}: " + ", ".join(f"{name} exited {code}" for name, code in exits)
            except Exception as error:  # noqa: BLE001 — the operator hears it; the platform goes on
                result = f"the restart of {service} stopped: {type(error).__name__}: {error}"
        say(result)
        (self.run / "fleet-result").write_text(result)
        request.unlink(missing_ok=True)


def ask(data_dir: Path, service: str, timeout_s: float) -> str:
    """The command's side: ask the launcher, wait for its answer."""
    run = _run_dir(data_dir)
    try:
        pid = int((run / "kiln-up.pid").read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        raise ControlError(f"no `kiln up` is running with the data folder {data_dir}") from None
    request, result = run / "fleet-request", run / "fleet-result"
    if request.exists():
        raise ControlError("another restart is under way")
    result.unlink(missing_ok=True)
    request.write_text(service)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while request.exists():
        if time.monotonic() > deadline:
            raise ControlError(f"no answer in {timeout_s:.0f} s (the restart may still be under way)")
        time.sleep(0.5)
    return result.read_text() if result.exists() else "the launcher took the request but left no answer"
