"""The HTTP side's sign-in, sessions, CSRF, limits and headers, on the app itself with
in-memory buckets (the real stack has its own tests in tests/integration)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import nats.js.errors
import pytest
from starlette.testclient import TestClient

from services.delivery.accounts import Accounts, AttemptLimit, Sessions
from services.delivery.hardening import MAX_BODY
from services.delivery.http import SESSION_COOKIE, Site, create_app
from services.delivery.image_records import ImageRecord, ImageRecords
from services.delivery.links import MAX_DOWNLOAD_TTL_S, Links, Signer
from shared.settings import Settings

ORIGIN = "http://testserver"
PASSWORD = "correct horse battery"
PNG = b"\x89PNG\r\n\x1a\n"


class FakeKeyValue:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str):
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError
        return SimpleNamespace(value=self.data[key])

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    async def create(self, key: str, value: bytes) -> None:
        if key in self.data:
            raise nats.js.errors.KeyWrongLastSequenceError
        self.data[key] = value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)


class FakeStore:
    async def get(self, name: str):
        if name != "alice/r1.png":
            raise nats.js.errors.ObjectNotFoundError
        return SimpleNamespace(data=PNG)


@pytest.fixture
def site() -> Site:
    settings = Settings.from_env({})
    links = Links(Signer(b"secret"), settings.base_url, settings.link_ttl_s, settings.share_ttl_s)
    return Site(
        bus=None,  # type: ignore[arg-type]  # nothing here reaches the bus
        store=FakeStore(),  # type: ignore[arg-type]
        records=ImageRecords(FakeKeyValue()),  # type: ignore[arg-type]
        links=links,
        settings=settings,
        accounts=Accounts(FakeKeyValue()),  # type: ignore[arg-type]
        sessions=Sessions(FakeKeyValue()),  # type: ignore[arg-type]
    )


@pytest.fixture
def http(site: Site) -> TestClient:
    return TestClient(create_app(site), headers={"Origin": ORIGIN})


def _sign_up(http: TestClient, user: str = "alice") -> str:
    response = http.post("/api/signup", json={"user": user, "password": PASSWORD})
    assert response.status_code == 201, response.text
    return response.json()["csrf"]


def test_sign_up_then_sign_in_with_the_password_only(http: TestClient, site: Site):
    _sign_up(http)
    stored = next(iter(site.accounts.kv.data.values()))  # type: ignore[attr-defined]
    assert b"$argon2id$" in stored and PASSWORD.encode() not in stored
    assert http.post("/api/signup", json={"user": "alice", "password": PASSWORD}).status_code == 409
    assert http.post("/api/signup", json={"user": "bob", "password": "short"}).status_code == 400
    assert http.post("/api/signup", json={"user": "not a name", "password": PASSWORD}).status_code == 400
    assert http.post("/api/login", json={"user": "alice", "password": "wrong password"}).status_code == 401
    assert http.post("/api/login", json={"user": "nobody", "password": PASSWORD}).status_code == 401
    assert http.post("/api/login", json={"user": "alice"}).status_code == 400
    signed_in = http.post("/api/login", json={"user": "alice", "password": PASSWORD})
    assert signed_in.status_code == 200 and signed_in.json()["csrf"]
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=lax" in cookie


def test_a_session_is_the_servers_and_logout_ends_it(http: TestClient, site: Site):
    csrf = _sign_up(http)
    cookie = http.cookies[SESSION_COOKIE]
    assert http.get("/images/alice/r1.png").status_code == 200
    assert http.post("/api/logout", json={}).status_code == 403  # no CSRF token
    assert http.post("/api/logout", json={}, headers={"X-CSRF-Token": csrf}).status_code == 200
    # The old cookie, sent again, opens nothing: the server forgot the session.
    replayed = TestClient(create_app(site), cookies={SESSION_COOKIE: cookie})
    assert replayed.get("/images/alice/r1.png").status_code == 403
    forged = TestClient(create_app(site), cookies={SESSION_COOKIE: "alice.9999999999.forged"})
    assert forged.get("/images/alice/r1.png").status_code == 403


def test_a_post_needs_the_sites_origin_and_the_sessions_csrf_token(http: TestClient, site: Site):
    csrf = _sign_up(http)
    share = "/api/images/r1/share"
    for origin in ("https://evil.example", "null", ""):
        response = http.post(share, json={}, headers={"Origin": origin, "X-CSRF-Token": csrf})
        assert response.status_code == 403 and "cross-site" in response.json()["error"], origin
    # Sign-in itself is refused cross-site (login CSRF).
    assert (
        http.post(
            "/api/login", json={"user": "alice", "password": PASSWORD}, headers={"Origin": "https://evil.example"}
        ).status_code
        == 403
    )
    assert http.post(share, json={}).status_code == 403  # same origin, no token
    assert http.post(share, json={}, headers={"X-CSRF-Token": "guess"}).status_code == 403


def test_sign_in_failures_are_limited_per_account_with_retry_after(http: TestClient):
    _sign_up(http)
    for _ in range(5):
        assert http.post("/api/login", json={"user": "alice", "password": "wrong password"}).status_code == 401
    limited = http.post("/api/login", json={"user": "alice", "password": PASSWORD})  # even the right one
    assert limited.status_code == 429 and 0 < int(limited.headers["Retry-After"]) <= 15 * 60


def test_the_limit_counts_per_address_and_forgets_after_its_window():
    limit = AttemptLimit(attempts=2, window_s=60)
    assert limit.retry_after("address:1.2.3.4", 0) is None
    limit.count("address:1.2.3.4", 0)
    limit.count("address:1.2.3.4", 10)
    assert limit.retry_after("address:1.2.3.4", 20) == 40
    assert limit.retry_after("address:5.6.7.8", 20) is None
    assert limit.retry_after("address:1.2.3.4", 61) is None  # the first failure aged out


def test_every_endpoint_has_a_body_limit_chunked_or_not(http: TestClient):
    big = b"x" * (MAX_BODY + 1)
    declared = http.post("/api/login", content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    chunked = http.post("/api/signup", content=iter([big[:40_000], big[40_000:]]))
    assert chunked.status_code == 413 and "64 KiB" in chunked.json()["error"]
    assert http.get("/healthz", headers={"Content-Length": str(MAX_BODY + 1)}).status_code == 413


@pytest.mark.parametrize("path", ["/", "/api/me", "/share/x?exp=1&sig=y", "/static/app.js", "/nowhere"])
def test_every_response_has_the_security_headers(http: TestClient, path: str):
    headers = http.get(path).headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"


def test_the_playground_page_has_no_inline_script_or_style(http: TestClient):
    page = http.get("/").text
    assert "<script>" not in page and "<style" not in page and "style=" not in page
    assert not re.search(r"\son[a-z]+=", page)  # no inline event handlers either


async def test_a_share_link_names_neither_the_owner_nor_the_request(http: TestClient, site: Site):
    await site.records.put(ImageRecord(user_id="alice", request_id="r1", prompt="a red circle", width=32, height=32))
    csrf = _sign_up(http)
    url = http.post("/api/images/r1/share", json={}, headers={"X-CSRF-Token": csrf}).json()["url"]
    assert "alice" not in url and "r1" not in url
    stranger = TestClient(create_app(site))
    page = stranger.get(url)
    assert page.status_code == 200 and "a red circle" in page.text and "alice" not in page.text
    image_src = page.text.split('id="shared-image" src="')[1].split('"')[0].replace("&amp;", "&")
    assert stranger.get(image_src).content == PNG
    assert stranger.get(url.replace("/share/", "/share/A")).status_code == 403


def test_a_download_link_lives_a_day_at_most():
    links = Links(Signer(b"secret"), "http://x", download_ttl_s=30 * 24 * 3600, share_ttl_s=60)
    assert links.download_ttl_s == MAX_DOWNLOAD_TTL_S == 24 * 3600
