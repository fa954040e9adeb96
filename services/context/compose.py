"""Compose the render job from a granted prompt. Pure: no I/O, easy to test."""

from __future__ import annotations

import hashlib

from shared.events import QuotaGranted, RenderRequested
from shared.subjects import image_key

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
        **_edit(grant),
    )


def _edit(grant: QuotaGranted) -> dict:
    """An edit starts from the user's own earlier image: the key is built from the granted
    user, so a prompt can never point at another user's image."""
    submission = grant.submission
    if submission.edit_of is None:
        return {}
    return {
        "mode": "inpaint" if submission.mask_key else "edit",
        "source_key": image_key(grant.user_id, submission.edit_of),
        "mask_key": submission.mask_key,
        "strength": submission.strength,
    }
