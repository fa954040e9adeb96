"""Failpoints: named places where a test can make a service fail on purpose, to prove that
nothing is lost when it fails exactly there. Off unless KILN_FAILPOINT names one (the
service runner arms it from the settings): `name` makes the process die there,
`name:raise` makes that step raise, `name:slow` makes it take a second longer; a place may
also ask whether another mode of its own is armed (`armed("render.batch:oom")`)."""

from __future__ import annotations

import os
import time

EXIT_CODE = 86
SLOW_S = 1.0

_armed: str | None = None


class InjectedFault(RuntimeError):
    pass


def arm(name: str | None) -> None:
    """Fail at the failpoint `name` (None: nowhere)."""
    global _armed
    _armed = name


def armed(name: str) -> bool:
    return _armed == name


def failpoint(name: str) -> None:
    if _armed == name:
        os._exit(EXIT_CODE)  # no cleanup, no flush: like a power cut to this process
    if _armed == f"{name}:raise":
        raise InjectedFault(f"failpoint {name}")
    if _armed == f"{name}:slow":
        time.sleep(SLOW_S)
