import msgspec

from services.delivery.outcome import outcome
from shared.events import Composition, ImageDelivered, RenderCompleted, RenderFailed, RequestFailed, decode


def test_completed_render_becomes_a_delivered_image_with_its_key_and_no_link():
    completed = RenderCompleted(
        request_id="r1",
        user_id="alice",
        image_key="alice/r1.png",
        width=32,
        height=32,
        seed=1,
        render_ms=12.5,
        worker_id="w1",
        prompt="a blue circle, watercolor",
        composition=Composition(text="make it blue", subject="a blue circle", style="watercolor", edit_of="r0"),
    )
    subject, event = outcome(completed)
    assert subject == "kiln.outcome.alice.r1"
    assert isinstance(event, ImageDelivered)
    # Kept a year: the key to the image, no link (one is signed when someone asks).
    assert event.image_key == "alice/r1.png" and event.url == ""
    assert event.render_ms == 12.5 and event.prompt == "a blue circle, watercolor"
    assert event.composition.edit_of == "r0"


def test_failed_render_becomes_a_failed_request_naming_the_stage():
    failed = RenderFailed(request_id="r1", user_id="alice", reason="render_error", detail="boom", worker_id="w1")
    subject, event = outcome(failed)
    assert subject == "kiln.outcome.alice.r1"
    assert isinstance(event, RequestFailed)
    assert (event.stage, event.reason, event.detail) == ("render", "render_error", "boom")


def test_an_outcome_stored_with_a_link_still_decodes():
    old = msgspec.json.encode(
        {
            "type": "ImageDelivered",
            "request_id": "r1",
            "user_id": "alice",
            "image_key": "alice/r1.png",
            "url": "http://kiln.test/images/alice/r1.png?exp=1&sig=x",
            "render_ms": 1.0,
        }
    )
    event = decode(old)
    assert isinstance(event, ImageDelivered) and event.image_key == "alice/r1.png"
