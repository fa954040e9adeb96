"""Render jobs and held deliveries for the worker modules' tests (no bus, no model)."""

from __future__ import annotations

from shared.consuming import Received
from shared.events import RenderRequested


def job(request_id: str = "r1", user_id: str = "alice", **fields) -> RenderRequested:
    base = dict(request_id=request_id, user_id=user_id, prompt="a red circle", width=32, height=32, steps=4, seed=1)
    return RenderRequested(**(base | fields))


def held(request_id: str = "r1", user_id: str = "alice", **fields) -> Received:
    """A claimed job as the worker holds it; `msg` stands in for the JetStream message."""
    return Received(job(request_id, user_id, **fields), msg=object())  # type: ignore[arg-type]
