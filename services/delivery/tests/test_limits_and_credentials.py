"""The sign-in and sign-up limits stay bounded in memory whoever drives them, and a
signed-in user gets a NATS credential for the CLI that is theirs alone (the real bus's
side of it is in tests/integration/test_cli_credentials.py)."""

from __future__ import annotations

import base64
import json
import os

import nkeys
import pytest
from starlette.testclient import TestClient

from infra.nats_auth import mint_credentials, user_permissions
from kiln.credentials import login_file, login_over_http
from services.delivery.accounts import AttemptLimit
from services.delivery.http import CLI_CREDENTIAL_TTL_S, SIGN_UPS_PER_ADDRESS, Site, create_app
from services.delivery.tests.test_http_security import PASSWORD, _sign_up, http, site  # noqa: F401 (fixtures)

ACCOUNT = nkeys.from_seed(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))


def _claims(creds: str) -> dict:
    jwt = creds.split("-----BEGIN NATS USER JWT-----")[1].split("------END")[0].strip()
    return json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))


# -- the limits' memory -------------------------------------------------------------------


def test_a_key_keeps_only_its_last_attempts():
    limit = AttemptLimit(attempts=3, window_s=60)
    for t in range(1000):
        limit.count("user:alice", t / 100)
    assert len(limit._seen["user:alice"]) == 3
    assert limit.retry_after("user:alice", 10) == 60  # the last three, all at ~9.99 s


def test_keys_past_their_window_are_forgotten_as_new_ones_come():
    limit = AttemptLimit(attempts=5, window_s=60)
    for n in range(1000):
        limit.count(f"user:guess{n}", 0)
    assert len(limit) == 1000
    limit.count("user:late", 61)  # every earlier key's newest attempt is past the window
    assert len(limit) == 1


def test_the_number_of_keys_is_capped_and_the_idlest_goes_first():
    limit = AttemptLimit(attempts=2, window_s=3600, max_keys=100)
    for n in range(10_000):  # a spray of names, all inside the window
        limit.count(f"user:spray{n}", n / 1000)
        if n == 9_950:
            limit.count("user:spray0", 9.95)  # active again: it goes to the back
    assert len(limit) == 100
    assert {"user:spray0", "user:spray9999"} <= limit._seen.keys() and "user:spray1" not in limit._seen


def test_a_key_limited_now_stays_limited_while_others_come_and_go():
    limit = AttemptLimit(attempts=2, window_s=60, max_keys=10)
    limit.count("user:alice", 0)
    limit.count("user:alice", 1)
    for n in range(5):
        limit.count(f"user:other{n}", 2)
    assert limit.retry_after("user:alice", 2) == 58


# -- sign-up per address ------------------------------------------------------------------


def test_sign_ups_are_limited_per_address_with_retry_after(http: TestClient):  # noqa: F811
    for n in range(SIGN_UPS_PER_ADDRESS):
        made = http.post("/api/signup", json={"user": f"user{n}", "password": "short"})  # refused, yet counted
        assert made.status_code == 400, made.text
    limited = http.post("/api/signup", json={"user": "one-more", "password": PASSWORD})
    assert limited.status_code == 429 and 0 < int(limited.headers["Retry-After"]) <= 3600
    assert "sign-ups" in limited.json()["error"]


# -- the CLI's credential -----------------------------------------------------------------


@pytest.fixture
def minting_site(site: Site) -> Site:  # noqa: F811
    site.mint_credentials = lambda user_id, ttl_s: mint_credentials(ACCOUNT, user_id, user_permissions(user_id), ttl_s)
    return site


def test_a_signed_in_user_gets_their_own_credential_for_an_hour(minting_site: Site):
    browser = TestClient(create_app(minting_site), headers={"Origin": "http://testserver"})
    csrf = _sign_up(browser, "alice")
    answer = browser.post("/api/credentials", json={}, headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["user"] == "alice" and body["command"] == "kiln login kiln.creds"
    claims = _claims(body["credentials"])
    assert claims["name"] == "alice" and claims["iss"] == ACCOUNT.public_key.decode()
    assert claims["exp"] - claims["iat"] == CLI_CREDENTIAL_TTL_S
    assert claims["nats"]["pub"]["allow"] == list(user_permissions("alice").publish)
    assert claims["nats"]["sub"]["allow"] == list(user_permissions("alice").subscribe)
    assert "-----BEGIN USER NKEY SEED-----" in body["credentials"]


def test_a_credential_needs_a_session_its_csrf_token_and_the_sites_origin(minting_site: Site):
    browser = TestClient(create_app(minting_site), headers={"Origin": "http://testserver"})
    assert browser.post("/api/credentials", json={}).status_code == 401
    csrf = _sign_up(browser, "alice")
    assert browser.post("/api/credentials", json={}).status_code == 403  # no CSRF token
    cross_site = browser.post(
        "/api/credentials", json={}, headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"}
    )
    assert cross_site.status_code == 403 and "cross-site" in cross_site.json()["error"]
    assert browser.get("/api/credentials").status_code == 405


def test_without_nats_authentication_there_is_no_credential_to_give(http: TestClient):  # noqa: F811
    csrf = _sign_up(http, "alice")
    refused = http.post("/api/credentials", json={}, headers={"X-CSRF-Token": csrf})
    assert refused.status_code == 404 and "KILN_NATS_AUTH=off" in refused.json()["error"]


def test_the_playground_page_offers_cli_access(http: TestClient):  # noqa: F811
    page = http.get("/").text
    assert 'id="get-credentials"' in page and "kiln login kiln.creds" in page


# -- `kiln login --http` ------------------------------------------------------------------


def test_kiln_login_over_http_keeps_the_users_credential_and_signs_out(
    minting_site: Site, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    browser = TestClient(create_app(minting_site), headers={"Origin": "http://testserver"})
    _sign_up(browser, "alice")
    cli = TestClient(create_app(minting_site))  # sends no Origin of its own: login_over_http must
    assert login_over_http("http://testserver", "alice", PASSWORD, client=cli) == "alice"
    kept = login_file()
    assert kept == tmp_path / ".config" / "kiln" / "credentials.creds"
    assert oct(kept.stat().st_mode & 0o777) == "0o600" and _claims(kept.read_text())["name"] == "alice"
    assert len(minting_site.sessions.kv.data) == 1  # type: ignore[attr-defined]  # the browser's; the CLI's ended
    with pytest.raises(ValueError, match=r"sign-in was refused \(401.*wrong user name or password"):
        login_over_http("http://testserver", "alice", "wrong password", client=TestClient(create_app(minting_site)))
    with pytest.raises(ValueError, match="--http wants the playground's address"):
        login_over_http("testserver:8480", "alice", PASSWORD)
