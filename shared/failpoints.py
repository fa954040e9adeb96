"""Failpoints: named places where a test can make a service die on purpose, to prove that
nothing is lost when a process dies exactly there. Off unless KILN_FAILPOINT names one."""

from __future__ import annotations

import os

EXIT_CODE = 86


def failpoint(name: str) -> None:
    if os.environ.get("KILN_FAILPOINT") == name:
        os._exit(EXIT_CODE)  # no cleanup, no flush: like a power cut to this process
