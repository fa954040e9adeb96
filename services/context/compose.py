"""Compose the render job from a granted prompt. Pure: no I/O, easy to test."""

from __future__ import annotations

import hashlib

from shared.events import QuotaGranted, RenderRequested

DEFAULT_GUIDANCE = 3.0


def seed_for(request_id: str) -> int:
    """A seed derived from the request, so a redelivered grant yields the same job."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:4], "big")


def render_request(grant: QuotaGranted) -> RenderRequested:
    submission = grant.submission
    return RenderRequested(
        request_id=grant.request_id,
        user_id=grant.user_id,
        conversation_id=grant.conversation_id,
        prompt=submission.prompt.strip(),
        width=submission.width,
        height=submission.height,
        steps=submission.steps,
        guidance=DEFAULT_GUIDANCE,
        seed=submission.seed if submission.seed is not None else seed_for(grant.request_id),
        tier=grant.tier,
    )
