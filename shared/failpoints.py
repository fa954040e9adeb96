"""Failpoints: named places where a test can make a service fail on purpose, to prove that
nothing is lost when it fails exactly there. Off unless KILN_FAILPOINT names one:
`name` makes the process die there, `name:raise` makes that step raise."""

from __future__ import annotations

import os

EXIT_CODE = 86


class InjectedFault(RuntimeError):
    pass


def failpoint(name: str) -> None:
    chosen = os.environ.get("KILN_FAILPOINT")
    if chosen == name:
        os._exit(EXIT_CODE)  # no cleanup, no flush: like a power cut to this process
    if chosen == f"{name}:raise":
        raise InjectedFault(f"failpoint {name}")
