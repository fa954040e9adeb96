"""Download and share links, share pages and who may fetch which image, on the real stack;
sign-in with a password, its limits, and the HTTP side's body limit and headers."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import msgspec
import pytest

from infra.nats_auth import Authority, user_permissions
from infra.platform import Platform
from kiln.client import KilnClient, ServiceUnavailable
from shared import subjects
from shared.events import ImageDelivered

pytestmark = pytest.mark.integration
PNG = b"\x89PNG\r\n\x1a\n"


PASSWORD = "correct horse battery"


def _browser_like(platform: Platform, **options) -> httpx.AsyncClient:
    """A client that sends the Origin a browser on the playground's page would: delivery
    refuses a POST from any other origin."""
    return httpx.AsyncClient(base_url=platform.http_url, timeout=30, headers={"Origin": platform.http_url}, **options)


@contextlib.asynccontextmanager
async def _signed_in(platform: Platform, user: str) -> AsyncIterator[httpx.AsyncClient]:
    """Signed up as `user` (signed in, if the account exists), with the session's CSRF token
    on every request, as the playground's page sends it."""
    async with _browser_like(platform) as http:
        response = await http.post("/api/signup", json={"user": user, "password": PASSWORD})
        if response.status_code == 409:
            response = await http.post("/api/login", json={"user": user, "password": PASSWORD})
        assert response.status_code in (200, 201), response.text
        http.headers["X-CSRF-Token"] = response.json()["csrf"]
        yield http


async def _image(client: KilnClient, user: str, prompt: str = "a red circle on a white background") -> ImageDelivered:
    outcome = await client.generate(prompt, user_id=user, steps=10)
    assert isinstance(outcome, ImageDelivered), outcome
    return outcome


def _with(url: str, **changes: str) -> str:
    """The URL with some query parameters changed."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query=urlencode(query)).geturl()


async def test_the_signed_download_link_opens_and_any_change_to_it_is_refused(
    platform: Platform, client: KilnClient, user: str
):
    delivered = await _image(client, user)
    url = (await client.link(user, delivered.request_id)).url
    async with httpx.AsyncClient(timeout=30) as anyone:
        response = await anyone.get(url)
        assert response.status_code == 200 and response.content.startswith(PNG)
        signature = parse_qs(urlsplit(url).query)["sig"][0]
        tampered = [
            _with(url, sig=("A" if signature[0] != "A" else "B") + signature[1:]),
            _with(url, exp=str(int(parse_qs(urlsplit(url).query)["exp"][0]) + 3600)),
            url.replace(f"/{delivered.request_id}.png", "/someone-elses.png"),
            _with(url, p="share"),  # a download link is not a share link
        ]
        for url in tampered:
            response = await anyone.get(url)
            assert response.status_code == 403, (url, response.text)
            assert "not valid" in response.json()["error"]


async def test_a_user_fetches_only_their_own_images_unless_shared(platform: Platform, client: KilnClient, user: str):
    delivered = await _image(client, user)
    path = f"/images/{user}/{delivered.request_id}.png"
    async with (
        _signed_in(platform, user) as owner,
        _signed_in(platform, f"{user}-other") as other,
        httpx.AsyncClient(base_url=platform.http_url) as nobody,
    ):
        assert (await owner.get(path)).status_code == 200
        refused = await other.get(path)
        assert refused.status_code == 403 and "not yours" in refused.json()["error"]
        assert (await nobody.get(path)).status_code == 403
        # Nor can another user share it.
        assert (await other.post(f"/api/images/{delivered.request_id}/share", json={})).status_code == 404

        share = (await owner.post(f"/api/images/{delivered.request_id}/share", json={})).json()
        page = await nobody.get(share["url"])
        assert page.status_code == 200 and delivered.prompt in page.text
        image_src = page.text.split('id="shared-image" src="')[1].split('"')[0].replace("&amp;", "&")
        image = await nobody.get(image_src)
        assert image.status_code == 200 and image.content.startswith(PNG)


async def test_an_expired_share_link_is_gone_and_a_tampered_one_forbidden(
    platform: Platform, client: KilnClient, user: str
):
    delivered = await _image(client, user)
    async with _signed_in(platform, user) as owner, httpx.AsyncClient(timeout=30) as anyone:
        share = (await owner.post(f"/api/images/{delivered.request_id}/share", json={"ttl_s": 2})).json()
        assert (await anyone.get(share["url"])).status_code == 200
        other_image = share["url"].replace("/share/", "/share/x")  # another share id
        assert (await anyone.get(other_image)).status_code == 403
        await asyncio.sleep(3.1)  # the link works for 2 s at least, 3 at most
        expired = await anyone.get(share["url"])
        assert expired.status_code == 410 and "expired" in expired.text
        # Bad requests to the API are answered, not crashed on.
        for body in ({"ttl_s": 0}, {"ttl_s": "soon"}, {"ttl_s": 10**9}, {"colour": "red"}):
            response = await owner.post(f"/api/images/{delivered.request_id}/share", json=body)
            assert response.status_code == 400, body


async def test_links_and_image_records_survive_a_restart_of_delivery(platform: Platform, client: KilnClient, user: str):
    delivered = await _image(client, user, "a blue square at the top")
    url = (await client.link(user, delivered.request_id)).url
    async with _signed_in(platform, user) as owner:
        share = (await owner.post(f"/api/images/{delivered.request_id}/share", json={})).json()
    platform.stop_service("delivery")
    platform.start_service("delivery")
    await platform.wait_ready()
    async with httpx.AsyncClient(timeout=30) as anyone:
        page = await anyone.get(share["url"])  # signed before the restart, checked after it
        assert page.status_code == 200 and "a blue square at the top" in page.text
        assert (await anyone.get(url)).content.startswith(PNG)


async def test_the_playground_api_needs_a_sign_in_and_refuses_bad_input(platform: Platform, user: str):
    async with _browser_like(platform) as nobody:
        assert (await nobody.post("/api/generate", json={"prompt": "a red circle"})).status_code == 401
        assert (await nobody.post("/api/signup", json={"user": "not a name!", "password": PASSWORD})).status_code == 400
        assert (await nobody.post("/api/signup", json={"user": user, "password": "short"})).status_code == 400
        assert (await nobody.post("/api/login", json={"user": user})).status_code == 400
        assert (await nobody.post("/api/login", content=b"{")).status_code == 400
        forged = httpx.AsyncClient(base_url=platform.http_url, cookies={"kiln_session": f"{user}.9999999999.forged"})
        async with forged:
            assert (await forged.get("/api/me")).status_code == 401
    async with _signed_in(platform, user) as http:
        me = (await http.get("/api/me")).json()
        assert me["user"] == user and me["quota"]["left"] == 3 and "watercolor" in me["styles"]
        assert me["sizes"] == [32]  # the bundled model's card: its only native size
        for body in ({}, {"prompt": 3}, {"prompt": "x", "conversation_id": "a.b"}, {"prompt": "x", "size": "big"}):
            response = await http.post("/api/generate", json=body)
            assert response.status_code == 400 and response.json()["error"], body


async def test_the_playground_api_streams_progress_then_the_image(platform: Platform, user: str):
    async with _signed_in(platform, user) as http:
        lines = []
        async with http.stream("POST", "/api/generate", json={"prompt": "a red circle", "steps": 30}) as response:
            assert response.headers["content-type"] == "application/x-ndjson"
            async for line in response.aiter_lines():
                if line:
                    lines.append(httpx.Response(200, content=line).json())
    events = [line["event"] for line in lines]
    assert events[0] == "accepted" and len(lines[0]["trace_id"]) == 32
    assert "progress" in events and events[-2:] == ["delivered", "quota"], events
    steps = [line["step"] for line in lines if line["event"] == "progress" and line["state"] == "rendering"]
    assert steps == sorted(steps) and steps[-1] == 30
    assert lines[-1]["quota"]["left"] == 2


async def test_a_share_url_names_neither_the_owner_nor_the_request(platform: Platform, client: KilnClient, user: str):
    delivered = await _image(client, user)
    async with _signed_in(platform, user) as owner, httpx.AsyncClient(timeout=30) as anyone:
        share = (await owner.post(f"/api/images/{delivered.request_id}/share", json={})).json()
        assert user not in share["url"] and delivered.request_id not in share["url"], share["url"]
        page = await anyone.get(share["url"])
        assert page.status_code == 200 and user not in page.text
    # A download link goes to its owner, and lives a day at most.
    link = await client.link(user, delivered.request_id)
    expires = int(parse_qs(urlsplit(link.url).query)["exp"][0])
    assert expires == link.expires_at.timestamp() <= time.time() + 24 * 3600 + 1


async def test_an_outcome_holds_no_link_and_a_user_gets_one_for_their_own_images_only(
    platform: Platform, client: KilnClient, user: str, tmp_path: Path
):
    """An outcome is kept a year: it holds the image's key, and a link is signed on demand."""
    delivered = await _image(client, user)
    # 1. What KILN_OUTCOMES keeps: the key, no signed link.
    stored = await client.bus.last_message(subjects.OUTCOMES, subjects.outcome(user, delivered.request_id))
    assert stored is not None
    kept = msgspec.json.decode(stored.data)
    assert kept["type"] == "ImageDelivered" and kept["image_key"] == f"{user}/{delivered.request_id}.png"
    assert kept.get("url", "") == "" and b"sig=" not in stored.data and b"/images/" not in stored.data
    # 2. Delivery signs one only for a delivered image.
    with pytest.raises(ServiceUnavailable, match="no delivered image"):
        await client.link(user, "never-asked")
    if not platform.nats_auth:
        return  # no credentials to scope: the rest is about a user's own
    # 3. The owner's own credential gets a fresh link that opens the image.
    authority = Authority.open(platform.data_dir)
    owner_creds = authority.write_credentials(tmp_path / "owner.creds", user, user_permissions(user))
    async with await KilnClient.connect(platform.nats_url, owner_creds, user) as own:
        link = await own.link(user, delivered.request_id)
        assert f"/images/{user}/{delivered.request_id}.png?" in link.url
        assert (await own.download(delivered)).startswith(PNG)  # through a link of its own
    async with httpx.AsyncClient(timeout=30) as anyone:
        response = await anyone.get(link.url)
        assert response.status_code == 200 and response.content.startswith(PNG)
    # 4. Another user's credential may not even ask for it: the server refuses the request.
    other = f"eve{uuid.uuid4().hex[:8]}"
    other_creds = authority.write_credentials(tmp_path / "other.creds", other, user_permissions(other))
    async with await KilnClient.connect(platform.nats_url, other_creds, other) as eve:
        with pytest.raises(ServiceUnavailable):
            await eve.link(user, delivered.request_id, timeout_s=1)


async def test_a_wrong_password_is_401_and_repeated_failures_429_with_retry_after(platform: Platform, user: str):
    async with _signed_in(platform, user):
        pass  # the account exists
    async with _browser_like(platform) as http:
        wrong = {"user": user, "password": "not the password"}
        for _ in range(5):
            refused = await http.post("/api/login", json=wrong)
            assert refused.status_code == 401 and "wrong user name or password" in refused.json()["error"]
        unknown = await http.post("/api/login", json={"user": f"{user}-nobody", "password": PASSWORD})
        assert unknown.status_code == 401  # the same answer as a wrong password: names stay private
        limited = await http.post("/api/login", json={"user": user, "password": PASSWORD})  # even the right one
        assert limited.status_code == 429, limited.text
        assert 0 < int(limited.headers["Retry-After"]) <= 15 * 60


async def test_every_endpoint_limits_its_body_even_chunked(platform: Platform, user: str):
    too_big = b"x" * (64 * 1024 + 1)

    async def chunks():
        for start in range(0, len(too_big), 8192):
            yield too_big[start : start + 8192]

    async with _signed_in(platform, user) as http:
        for path in ("/api/login", "/api/signup", "/api/generate", "/api/logout"):
            response = await http.post(path, content=too_big, headers={"Content-Type": "application/json"})
            assert response.status_code == 413, (path, response.text)
        chunked = await http.post("/api/generate", content=chunks())  # no Content-Length
        assert chunked.status_code == 413 and "64 KiB" in chunked.json()["error"]
        assert (await http.get("/api/me")).status_code == 200  # the session is still fine


async def test_every_response_carries_the_security_headers(platform: Platform, user: str):
    async with _signed_in(platform, user) as http:
        for path in ("/", "/static/app.js", "/api/me", "/images/nobody/r1.png", "/share/x", "/healthz"):
            headers = (await http.get(path)).headers
            policy = headers["content-security-policy"]
            assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, path
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["referrer-policy"] == "same-origin", path
        # A POST from another site is refused, even with the session's cookie and token.
        cross = await http.post("/api/generate", json={"prompt": "x"}, headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
