"""Sign-in with an OpenID Connect issuer, beside the passwords, when settings name one
(KILN_OIDC_ISSUER): the authorization-code flow with PKCE (S256), state and nonce.

- `start` makes a state, a nonce and a PKCE verifier, keeps them server-side (in the
  sessions bucket, under the state's SHA-256, so every replica can finish the flow) and
  answers the issuer's authorization URL; the browser also keeps the state in a short-lived
  cookie, so a callback only finishes in the browser that started it (no login CSRF).
- `finish` takes the pending sign-in (once), exchanges the code at the token endpoint and
  checks the ID token: its signature against the issuer's JWKS, `iss`, `aud` (the client
  id), `exp` and the `nonce`. It answers the Kiln user id.

The issuer's discovery document and JWKS are fetched with the injected httpx client and
cached; the JWKS is fetched again when a token names a key it does not hold (key rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

PENDING_TTL_S = 10 * 60  # from start to callback: time to sign in at the issuer
JWKS_REFETCH_S = 60  # a token naming an unknown key refetches the JWKS at most this often
# Asymmetric algorithms only: never `none`, never HS* (whose key would be the client secret).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class SignInError(Exception):
    """A callback that signs no one in; the message says why."""

    status = 401


class BadCallback(SignInError):
    """The callback itself is wrong: no or another state, an unknown or expired sign-in."""

    status = 400


class Pending(msgspec.Struct, kw_only=True):
    nonce: str
    verifier: str  # PKCE: the token endpoint gets it, the issuer saw only its hash
    started_at: float


class OpenIDProvider:
    def __init__(
        self,
        issuer: str,
        client_id: str,
        client_secret: str | None,
        redirect_uri: str,
        kv: KeyValue,
        http: httpx.AsyncClient,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri
        self.kv = kv
        self.http = http
        self._config: dict[str, Any] | None = None
        self._keys: jwt.PyJWKSet | None = None
        self._keys_at = 0.0

    @property
    def host(self) -> str:
        return httpx.URL(self.issuer).host

    async def start(self) -> tuple[str, str]:
        """A new sign-in: (the state, the issuer's URL to send the browser to)."""
        config = await self._configuration()
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        pending = Pending(nonce=nonce, verifier=verifier, started_at=time.time())
        await self.kv.put(_pending_key(state), msgspec.json.encode(pending))
        query = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": "openid profile",
            "state": state,
            "nonce": nonce,
            "code_challenge": _challenge(verifier),
            "code_challenge_method": "S256",
        }
        return state, f"{config['authorization_endpoint']}?{urlencode(query)}"

    async def finish(self, state: str | None, cookie_state: str | None, code: str | None) -> str:
        """The Kiln user id of a callback's sign-in; SignInError (BadCallback) if it is not one."""
        # 1. The state must be the one this browser started with, and still pending.
        if not state or not cookie_state or not hmac.compare_digest(state.encode(), cookie_state.encode()):
            raise BadCallback("this sign-in was not started in this browser: start it again")
        pending = await self._take(state)
        if pending is None or pending.started_at < time.time() - PENDING_TTL_S:
            raise BadCallback("this sign-in is unknown, used or expired: start it again")
        if not code:
            raise BadCallback("the issuer sent no code")
        # 2. The code, for tokens.
        id_token = await self._exchange(code, pending.verifier)
        # 3. The ID token: the issuer's signature, for this client, unexpired, this sign-in's.
        claims = await self._verify(id_token)
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), pending.nonce.encode()):
            raise SignInError("the ID token is not this sign-in's (nonce)")
        return user_id_of(claims)

    async def _take(self, state: str) -> Pending | None:
        key = _pending_key(state)
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        await self.kv.delete(key)  # one use
        return msgspec.json.decode(entry.value or b"", type=Pending)

    async def _exchange(self, code: str, verifier: str) -> str:
        config = await self._configuration()
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "client_id": self.client_id,
            "code_verifier": verifier,
        }
        # client_secret_basic, the default token_endpoint_auth_method; a public client sends none.
        auth = (self.client_id, self.client_secret) if self.client_secret else None
        try:
            response = await self.http.post(config["token_endpoint"], data=form, auth=auth)
        except httpx.HTTPError as error:
            raise SignInError(f"the issuer's token endpoint did not answer: {error}") from error
        if response.status_code != 200:
            raise SignInError(f"the issuer refused the code ({response.status_code})")
        try:
            id_token = response.json().get("id_token")
        except (ValueError, AttributeError):  # not JSON, or not an object
            id_token = None
        if not isinstance(id_token, str):
            raise SignInError("the issuer's answer has no ID token")
        return id_token

    async def _verify(self, id_token: str) -> dict[str, Any]:
        config = await self._configuration()
        try:
            header = jwt.get_unverified_header(id_token)
            key = await self._key(header.get("kid"))
            return jwt.decode(
                id_token,
                key=key,
                algorithms=[header.get("alg", "")] if header.get("alg") in ALGORITHMS else [],
                audience=self.client_id,
                issuer=config["issuer"],
                options={"require": ["iss", "aud", "exp", "iat", "sub"]},
                leeway=30,
            )
        except jwt.PyJWTError as error:
            raise SignInError(f"the ID token does not hold: {error}") from error

    async def _key(self, kid: str | None) -> jwt.PyJWK:
        keys = await self._jwks(refresh=False)
        for attempt in range(2):
            matching = [key for key in keys.keys if kid is None or key.key_id == kid]
            if len(matching) == 1:
                return matching[0]
            if attempt == 0 and time.monotonic() - self._keys_at > JWKS_REFETCH_S:
                keys = await self._jwks(refresh=True)  # the issuer may have rotated its keys
        raise jwt.InvalidKeyError(f"the issuer has no single key {kid!r}")

    async def _jwks(self, refresh: bool) -> jwt.PyJWKSet:
        if self._keys is None or refresh:
            config = await self._configuration()
            self._keys = jwt.PyJWKSet.from_dict(await self._get_json(config["jwks_uri"]))
            self._keys_at = time.monotonic()
        return self._keys

    async def _configuration(self) -> dict[str, Any]:
        if self._config is None:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            config = await self._get_json(url)
            # The issuer it names must be the one configured (OpenID Connect Discovery 4.3).
            if config.get("issuer") != self.issuer:
                raise SignInError(f"{url} names the issuer {config.get('issuer')!r}, not {self.issuer!r}")
            self._config = config
        return self._config

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self.http.get(url)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise SignInError(f"the issuer's {url} did not answer: {error}") from error


def user_id_of(claims: dict[str, Any]) -> str:
    """The Kiln user: `oidc-` and 16 hex digits of SHA-256 over the issuer and `sub`. Never
    the token's `preferred_username`: many issuers let a user change it, and an issuer's
    `alice` must not become the playground's password account `alice` (and her images)."""
    digest = hashlib.sha256(f"{claims['iss']}\n{claims['sub']}".encode()).hexdigest()
    return f"oidc-{digest[:16]}"


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _pending_key(state: str) -> str:
    return "oidc-" + hashlib.sha256(state.encode()).hexdigest()
