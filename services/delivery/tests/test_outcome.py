from services.delivery.outcome import outcome
from shared.events import ImageDelivered, RenderCompleted, RenderFailed, RequestFailed


def test_completed_render_becomes_a_delivered_image_with_a_link():
    completed = RenderCompleted(
        request_id="r1", user_id="alice", image_key="r1.png", width=32, height=32, seed=1,
        render_ms=12.5, worker_id="w1",
    )
    subject, event = outcome(completed, "http://kiln.test")
    assert subject == "kiln.outcome.alice.r1"
    assert isinstance(event, ImageDelivered)
    assert event.url == "http://kiln.test/images/alice/r1.png" and event.render_ms == 12.5


def test_failed_render_becomes_a_failed_request_naming_the_stage():
    failed = RenderFailed(request_id="r1", user_id="alice", reason="render_error", detail="boom", worker_id="w1")
    subject, event = outcome(failed, "http://kiln.test")
    assert subject == "kiln.outcome.alice.r1"
    assert isinstance(event, RequestFailed)
    assert (event.stage, event.reason, event.detail) == ("render", "render_error", "boom")
