"""What a render event means for the user. Pure: no I/O."""

from __future__ import annotations

from shared import subjects
from shared.events import ImageDelivered, RenderCompleted, RenderFailed, RequestFailed


def image_url(public_url: str, user_id: str, request_id: str) -> str:
    return f"{public_url}/images/{user_id}/{request_id}.png"


def outcome(
    event: RenderCompleted | RenderFailed, public_url: str
) -> tuple[str, ImageDelivered | RequestFailed]:
    """The outcome event for a render event, and the subject it goes to."""
    ids = dict(request_id=event.request_id, user_id=event.user_id, conversation_id=event.conversation_id)
    if isinstance(event, RenderCompleted):
        delivered = ImageDelivered(
            **ids,
            image_key=event.image_key,
            url=image_url(public_url, event.user_id, event.request_id),
            render_ms=event.render_ms,
        )
        return subjects.outcome(event.user_id, event.request_id), delivered
    failed = RequestFailed(**ids, stage="render", reason=event.reason, detail=event.detail)
    return subjects.outcome(event.user_id, event.request_id), failed
