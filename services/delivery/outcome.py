"""What a render event means for the user. Pure: no I/O."""

from __future__ import annotations

from services.delivery.links import Links
from shared import subjects
from shared.events import ImageDelivered, RenderCompleted, RenderFailed, RequestFailed


def outcome(
    event: RenderCompleted | RenderFailed, links: Links, now: float
) -> tuple[str, ImageDelivered | RequestFailed]:
    """The outcome event for a render event, and the subject it goes to. A delivered image
    carries a signed download link that expires."""
    ids = dict(
        request_id=event.request_id, user_id=event.user_id, conversation_id=event.conversation_id, plan=event.plan
    )
    if isinstance(event, RenderCompleted):
        delivered = ImageDelivered(
            **ids,
            image_key=event.image_key,
            url=links.download(event.user_id, event.request_id, now),
            render_ms=event.render_ms,
            prompt=event.prompt,
            composition=event.composition,
        )
        return subjects.outcome(event.user_id, event.request_id), delivered
    failed = RequestFailed(**ids, stage="render", reason=event.reason, detail=event.detail)
    return subjects.outcome(event.user_id, event.request_id), failed
