"""What a render event means for the user. Pure: no I/O."""

from __future__ import annotations

from shared import subjects
from shared.events import ImageDelivered, RenderCompleted, RenderFailed, RequestFailed


def outcome(event: RenderCompleted | RenderFailed) -> tuple[str, ImageDelivered | RequestFailed]:
    """The outcome event for a render event, and the subject it goes to. A delivered image
    carries its key in the image bucket, not a link: the outcome is kept a year, a link is
    signed when someone asks for one (`Delivery.answer_link`)."""
    ids = dict(
        request_id=event.request_id, user_id=event.user_id, conversation_id=event.conversation_id, plan=event.plan
    )
    if isinstance(event, RenderCompleted):
        delivered = ImageDelivered(
            **ids,
            image_key=event.image_key,
            render_ms=event.render_ms,
            prompt=event.prompt,
            composition=event.composition,
        )
        return subjects.outcome(event.user_id, event.request_id), delivered
    failed = RequestFailed(**ids, stage="render", reason=event.reason, detail=event.detail)
    return subjects.outcome(event.user_id, event.request_id), failed
