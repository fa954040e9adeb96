from urllib.parse import parse_qs, urlsplit

from services.delivery.links import Links, Signer
from services.delivery.outcome import outcome
from shared.events import Composition, ImageDelivered, RenderCompleted, RenderFailed, RequestFailed

LINKS = Links(Signer(b"secret"), "http://kiln.test", download_ttl_s=3600, share_ttl_s=86400)


def test_completed_render_becomes_a_delivered_image_with_a_signed_link():
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
    subject, event = outcome(completed, LINKS, now=1000.0)
    assert subject == "kiln.outcome.alice.r1"
    assert isinstance(event, ImageDelivered)
    url = urlsplit(event.url)
    assert (url.scheme, url.netloc, url.path) == ("http", "kiln.test", "/images/alice/r1.png")
    query = parse_qs(url.query)
    assert query["exp"] == ["4600"]  # now + the download TTL
    LINKS.signer.check("download", "alice/r1", query["exp"][0], query["sig"][0], now=1000.0)
    assert event.render_ms == 12.5 and event.prompt == "a blue circle, watercolor"
    assert event.composition.edit_of == "r0"


def test_failed_render_becomes_a_failed_request_naming_the_stage():
    failed = RenderFailed(request_id="r1", user_id="alice", reason="render_error", detail="boom", worker_id="w1")
    subject, event = outcome(failed, LINKS, now=1000.0)
    assert subject == "kiln.outcome.alice.r1"
    assert isinstance(event, RequestFailed)
    assert (event.stage, event.reason, event.detail) == ("render", "render_error", "boom")
