"""Sign-in with an OpenID Connect issuer: the app in-process against in-memory buckets, and
a fake issuer (a small Starlette app) reached through httpx.ASGITransport."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from services.delivery.hardening import SECURITY_HEADERS
from services.delivery.http import OIDC_STATE_COOKIE, SESSION_COOKIE, Site, create_app
from services.delivery.oidc import OpenIDProvider, user_id_of
from services.delivery.tests.test_http_security import ORIGIN
from services.delivery.tests.test_http_security import site as site  # noqa: F401  # the fixture

ISSUER = "https://issuer.example"
SUBJECT = "248289761001"
CLIENT_ID = "kiln-playground"
KID = "key-1"


class FakeIssuer:
    """An OpenID provider: discovery, JWKS and a token endpoint. `authorize` stands for the
    user signing in at the issuer; `claims` and `signing_key` let a test make a bad token."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.signing_key = self.key
        self.claims: dict = {}
        self.codes: dict[str, dict] = {}
        self.app = Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self.configuration),
                Route("/jwks", self.jwks),
                Route("/token", self.token, methods=["POST"]),
            ]
        )

    def authorize(self, url: str) -> tuple[str, str]:
        """The user signs in: (the code, the state) the issuer redirects back with."""
        query = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
        assert url.startswith(f"{ISSUER}/authorize?") and query["client_id"] == CLIENT_ID
        assert query["code_challenge_method"] == "S256" and query["response_type"] == "code"
        code = f"code-{len(self.codes)}"
        self.codes[code] = query
        return code, query["state"]

    async def configuration(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/authorize",
                "token_endpoint": f"{ISSUER}/token",
                "jwks_uri": f"{ISSUER}/jwks",
            }
        )

    async def jwks(self, request: Request) -> JSONResponse:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return JSONResponse({"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]})

    async def token(self, request: Request) -> JSONResponse:
        form = {name: values[0] for name, values in parse_qs((await request.body()).decode()).items()}
        asked = self.codes.pop(form["code"], None)
        if asked is None or form["redirect_uri"] != asked["redirect_uri"]:
            return JSONResponse({"error": "invalid_grant"}, 400)
        verifier = form["code_verifier"].encode()
        if base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode() != asked["code_challenge"]:
            return JSONResponse({"error": "invalid_grant", "error_description": "PKCE"}, 400)
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": CLIENT_ID,
            "sub": SUBJECT,
            "preferred_username": "carol",
            "iat": now,
            "exp": now + 300,
            "nonce": asked["nonce"],
            **self.claims,
        }
        id_token = jwt.encode(claims, self.signing_key, algorithm="RS256", headers={"kid": KID})
        return JSONResponse({"access_token": "opaque", "token_type": "Bearer", "id_token": id_token})


@pytest.fixture
def issuer() -> FakeIssuer:
    return FakeIssuer()


@pytest.fixture
def http(site: Site, issuer: FakeIssuer) -> TestClient:  # noqa: F811
    site.oidc = OpenIDProvider(
        ISSUER,
        CLIENT_ID,
        None,
        f"{site.settings.base_url}/api/oidc/callback",
        site.sessions.kv,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=issuer.app)),
    )
    return TestClient(create_app(site), headers={"Origin": ORIGIN}, follow_redirects=False)


def _start(http: TestClient, issuer: FakeIssuer) -> tuple[str, str]:
    started = http.get("/api/oidc/start")
    assert started.status_code == 303, started.text
    assert OIDC_STATE_COOKIE in http.cookies
    return issuer.authorize(started.headers["location"])


def _signed_in(http: TestClient, site: Site) -> str | None:  # noqa: F811
    """Whom the browser's session cookie signs in, as the server keeps it."""
    session = asyncio.run(site.sessions.get(http.cookies.get(SESSION_COOKIE)))
    return session.user_id if session else None


def test_the_page_offers_the_issuer_and_a_round_trip_signs_in(
    http: TestClient,
    site: Site,  # noqa: F811
    issuer: FakeIssuer,
):
    offered = http.get("/api/me")
    assert offered.status_code == 401
    assert offered.json()["oidc"] == {"start": "/api/oidc/start", "host": "issuer.example"}
    code, state = _start(http, issuer)
    back = http.get("/api/oidc/callback", params={"code": code, "state": state})
    assert back.status_code == 303 and back.headers["location"] == "/", back.text
    for name, value in SECURITY_HEADERS.items():
        assert back.headers[name] == value
    assert "HttpOnly" in back.headers["set-cookie"] and SESSION_COOKIE in http.cookies
    assert _signed_in(http, site) == user_id_of({"iss": ISSUER, "sub": SUBJECT})
    # The state is used up: the same callback again signs no one in.
    again = TestClient(http.app, cookies={OIDC_STATE_COOKIE: state}, follow_redirects=False)
    assert again.get("/api/oidc/callback", params={"code": code, "state": state}).status_code == 400


@pytest.mark.parametrize(
    ("spoil", "status"),
    [
        ("state", 400),
        ("no state cookie", 400),
        ("nonce", 401),
        ("another key", 401),
        ("audience", 401),
        ("expired", 401),
        ("issuer", 401),
    ],
)
def test_a_bad_callback_or_id_token_signs_no_one_in(
    http: TestClient,
    site: Site,  # noqa: F811
    issuer: FakeIssuer,
    spoil: str,
    status: int,
):
    code, state = _start(http, issuer)
    if spoil == "state":
        state = state[:-2] + "xx"
    elif spoil == "no state cookie":
        http.cookies.clear()
    elif spoil == "nonce":
        issuer.claims = {"nonce": "another sign-in's nonce"}
    elif spoil == "another key":
        issuer.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif spoil == "audience":
        issuer.claims = {"aud": "another-client"}
    elif spoil == "expired":
        issuer.claims = {"iat": int(time.time()) - 3600, "exp": int(time.time()) - 600}
    elif spoil == "issuer":
        issuer.claims = {"iss": "https://evil.example"}
    refused = http.get("/api/oidc/callback", params={"code": code, "state": state})
    assert refused.status_code == status, refused.text
    assert SESSION_COOKIE not in http.cookies and _signed_in(http, site) is None
    assert all(key.startswith("oidc-") for key in site.sessions.kv.data)  # type: ignore[attr-defined]  # no session


def test_without_an_issuer_nothing_changes(site: Site):  # noqa: F811
    http = TestClient(create_app(site), headers={"Origin": ORIGIN}, follow_redirects=False)
    assert http.get("/api/me").json() == {"error": "sign in first"}
    assert http.get("/api/oidc/start").status_code == 404
    assert http.get("/api/oidc/callback", params={"code": "c", "state": "s"}).status_code == 404


def test_the_user_id_comes_from_the_issuer_and_sub_never_from_a_name_the_user_picks():
    claims = {"iss": ISSUER, "sub": "248289761001"}
    derived = user_id_of(claims)
    assert derived.startswith("oidc-") and len(derived) == 21
    # A name matching a password account ("carol") does not make the user carol.
    assert user_id_of({**claims, "preferred_username": "carol"}) == derived
    assert user_id_of({**claims, "sub": "another"}) != derived
