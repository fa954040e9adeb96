"""delivery's HTTP side (Starlette): images, share pages, the playground and its API.

    GET  /                                  the playground (static files in playground/)
    POST /api/signup, /api/login            make an account / sign in, with a password: a
                                            session cookie, and the session's CSRF token
    POST /api/logout                        end the session (the server forgets it)
    POST /api/credentials                   a NATS credential for the signed-in user, for the
                                            CLI (`kiln login`): that user's subjects only, 1 h
    GET  /api/oidc/start, /api/oidc/callback  sign in at the OpenID Connect issuer, if settings
                                            name one (services.delivery.oidc); same session
    GET  /api/me                            who is signed in, the CSRF token, today's quota,
                                            the styles, the sizes offered (the model's native ones)
    POST /api/generate                      publish a prompt; NDJSON lines: accepted,
                                            progress…, then delivered / denied / failed
    GET  /api/conversations/<conversation>  its turns, each with its outcome
    POST /api/images/<request>/share        a signed share link (body: {"ttl_s": …})
    GET  /images/<user>/<request>.png       the PNG: for its owner's session, or a signed link
    GET  /share/<share id>                  the share page: image and prompt, no sign-in
    GET  /share/<share id>/image.png        its image
    GET  /healthz

A session sees only its own images, and a link opens only the image it was signed for. Every
POST must come from the site's own origin (hardening.Hardened) and, once signed in, carry the
session's CSRF token in X-CSRF-Token; sign-in failures are limited per account and per address,
sign-ups per address.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats.errors
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from kiln.client import KilnClient, ServiceUnavailable
from services.delivery.accounts import AccountError, Accounts, AttemptLimit, Session, Sessions
from services.delivery.hardening import Hardened, TooLarge
from services.delivery.image_records import ImageRecords
from services.delivery.links import LinkError, Links, expiry, image_subject, share_subject
from services.delivery.oidc import PENDING_TTL_S, OpenIDProvider, SignInError
from shared import model_card, subjects
from shared.bus import Bus
from shared.events import (
    DEFAULT_SIZE,
    DEFAULT_STEPS,
    ID_PATTERN,
    ImageDelivered,
    PromptSubmitted,
    QuotaDenied,
    RenderProgress,
    check_ids,
    decode_json,
)
from shared.records import Outcome
from shared.settings import Settings
from shared.telemetry import trace_id_of, user_attributes

PLAYGROUND = Path(__file__).with_name("playground")
# The __Host- prefix binds the cookie to this host and path / (no subdomain can set or read
# it), but browsers take it only with Secure, which plain http cannot have: on http (a local
# playground) the cookie goes by the plain name.
SECURE_SESSION_COOKIE = "__Host-kiln_session"
SESSION_COOKIE = "kiln_session"
SESSION_TTL_S = int(subjects.SESSIONS.ttl_s or 0)  # the cookie lives as long as the server keeps the session
CSRF_HEADER = "X-CSRF-Token"
# Holds an OpenID Connect sign-in's state from start to callback; only the callback path sees it.
OIDC_STATE_COOKIE = "kiln_oidc_state"
OIDC_PATH = "/api/oidc"
# Failed sign-ins allowed per 15 minutes: few per account (guessing one password), more per
# address (people behind one NAT mistype too; spraying many accounts still meets the limit).
SIGN_IN_WINDOW_S = 15 * 60
SIGN_IN_FAILURES_PER_ACCOUNT = 5
SIGN_IN_FAILURES_PER_ADDRESS = 30
# Sign-ups per address an hour: each costs an argon2 hash (64 MiB, tens of ms of a core),
# so an address may not make the server hash without end; a classroom behind one NAT fits.
SIGN_UP_WINDOW_S = 3600
SIGN_UPS_PER_ADDRESS = 60
# A CLI credential from the playground lives an hour: long enough for a session at the
# terminal, short enough that a lost file soon opens nothing (it cannot be revoked sooner
# without pushing a new account JWT, see infra.nats_auth).
CLI_CREDENTIAL_TTL_S = 3600
MAX_SHARE_TTL_S = 30 * 24 * 3600
GENERATE_TIMEOUT_S = 300

tracer = trace.get_tracer("kiln.playground")
log = logging.getLogger("kiln.delivery")


class GenerateBody(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str
    conversation_id: str = ""
    style: str | None = None
    edit_of: str | None = None
    strength: float = 0.8
    size: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS


class ShareBody(msgspec.Struct, forbid_unknown_fields=True):
    ttl_s: int | None = None


class SignInBody(msgspec.Struct, forbid_unknown_fields=True):
    user: str
    password: str


# Mints a NATS credential: (user id, seconds valid) → the .creds text.
MintCredentials = Callable[[str, float], str]


@dataclass
class Site:
    bus: Bus
    store: ObjectStore
    records: ImageRecords
    links: Links
    settings: Settings
    accounts: Accounts
    sessions: Sessions
    # None where this delivery holds no account key (NATS without authentication).
    mint_credentials: MintCredentials | None = None
    # None unless settings name an OpenID Connect issuer.
    oidc: OpenIDProvider | None = None
    account_failures: AttemptLimit = field(
        default_factory=lambda: AttemptLimit(SIGN_IN_FAILURES_PER_ACCOUNT, SIGN_IN_WINDOW_S)
    )
    address_failures: AttemptLimit = field(
        default_factory=lambda: AttemptLimit(SIGN_IN_FAILURES_PER_ADDRESS, SIGN_IN_WINDOW_S)
    )
    address_sign_ups: AttemptLimit = field(default_factory=lambda: AttemptLimit(SIGN_UPS_PER_ADDRESS, SIGN_UP_WINDOW_S))

    @property
    def client(self) -> KilnClient:
        return KilnClient(self.bus)  # the SDK on the service's own connection

    @property
    def secure(self) -> bool:
        return self.settings.base_url.startswith("https://")

    @property
    def session_cookie(self) -> str:
        return SECURE_SESSION_COOKIE if self.secure else SESSION_COOKIE

    async def session(self, request: Request) -> Session | None:
        return await self.sessions.get(request.cookies.get(self.session_cookie))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _too_many(wait: int, what: str) -> JSONResponse:
    response = _error(429, f"too many {what}; try again in {wait} s")
    response.headers["Retry-After"] = str(wait)
    return response


def _address(request: Request) -> str:
    return f"address:{request.client.host if request.client else '?'}"


async def _body(request: Request, kind: type[msgspec.Struct]):
    raw = await request.body()
    return decode_json(raw or b"{}", kind)


def create_app(site: Site) -> Starlette:
    def signed_in(handler: Callable[[Request, str], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """The endpoint for `handler`, which gets the signed-in user; 401 without a session,
        403 on a state-changing request without the session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            if (session := await site.session(request)) is None:
                return _error(401, "sign in first")
            if request.method not in ("GET", "HEAD") and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), session.csrf.encode()
            ):
                return _error(403, f"missing or wrong {CSRF_HEADER}: reload the page and try again")
            return await handler(request, session.user_id)

        return endpoint

    # -- accounts and sessions -------------------------------------------------------------

    async def signed_in_as(user_id: str, status: int = 200, response: Response | None = None) -> Response:
        """`response` (by default the user and the CSRF token) with a new session's cookie."""
        cookie, session = await site.sessions.open(user_id)
        if response is None:
            response = JSONResponse({"user": user_id, "csrf": session.csrf}, status_code=status)
        response.set_cookie(
            site.session_cookie,
            cookie,
            max_age=SESSION_TTL_S,
            path="/",
            httponly=True,
            samesite="lax",  # the cookie comes along when a link from elsewhere opens the playground
            secure=site.secure,
        )
        return response

    async def signup(request: Request) -> Response:
        try:
            body = await _body(request, SignInBody)
        except msgspec.DecodeError:
            return _error(400, 'send JSON: {"user": "alice", "password": "…"}')
        # Every attempt counts, made or not: each one costs a hash.
        address, now = _address(request), time.time()
        if wait := site.address_sign_ups.retry_after(address, now):
            return _too_many(wait, "sign-ups from your address")
        site.address_sign_ups.count(address, now)
        try:
            await site.accounts.sign_up(body.user.strip(), body.password)
        except AccountError as error:
            return _error(error.status, str(error))
        return await signed_in_as(body.user.strip(), status=201)

    async def login(request: Request) -> Response:
        try:
            body = await _body(request, SignInBody)
        except msgspec.DecodeError:
            return _error(400, 'send JSON: {"user": "alice", "password": "…"}')
        # 1. Refuse while the account or the address is past its failures: before the
        #    password is checked, so a guess past the limit learns nothing.
        user_id, now = body.user.strip(), time.time()
        account, address = f"user:{user_id}", _address(request)
        waits = [site.account_failures.retry_after(account, now), site.address_failures.retry_after(address, now)]
        if wait := max((w for w in waits if w is not None), default=None):
            return _too_many(wait, "failed sign-ins")
        # 2. Check the password (unknown names cost the same time, and get the same answer).
        if not await site.accounts.verify(user_id, body.password):
            site.account_failures.count(account, now)
            site.address_failures.count(address, now)
            return _error(401, "wrong user name or password")
        site.account_failures.forget(account)
        return await signed_in_as(user_id)

    async def logout(request: Request) -> Response:
        cookie = request.cookies.get(site.session_cookie)
        if (session := await site.sessions.get(cookie)) is not None:
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), session.csrf.encode()):
                return _error(403, f"missing or wrong {CSRF_HEADER}: reload the page and try again")
            await site.sessions.close(cookie or "")
        response = JSONResponse({"user": None})
        response.delete_cookie(site.session_cookie, path="/", secure=site.secure, httponly=True, samesite="lax")
        return response

    async def oidc_start(request: Request) -> Response:
        if site.oidc is None:
            return _error(404, "this Kiln signs in with passwords only (no KILN_OIDC_ISSUER)")
        try:
            state, url = await site.oidc.start()
        except SignInError as error:
            return _page(502, "Sign-in is unavailable", str(error))
        response = RedirectResponse(url, status_code=303)
        # Lax: the issuer's redirect back is a top-level GET, which brings it along.
        response.set_cookie(
            OIDC_STATE_COOKIE,
            state,
            max_age=PENDING_TTL_S,
            path=OIDC_PATH,
            httponly=True,
            samesite="lax",
            secure=site.secure,
        )
        return response

    async def oidc_callback(request: Request) -> Response:
        if site.oidc is None:
            return _error(404, "this Kiln signs in with passwords only (no KILN_OIDC_ISSUER)")
        query = request.query_params
        try:
            if "error" in query:  # the user declined, or the issuer refused
                raise SignInError(f"the issuer said {query['error']}: {query.get('error_description', '')}")
            user_id = await site.oidc.finish(
                query.get("state"), request.cookies.get(OIDC_STATE_COOKIE), query.get("code")
            )
        except SignInError as error:
            log.info("OpenID Connect sign-in refused: %s", error)
            refused = _page(error.status, "Sign-in failed", str(error))
            refused.delete_cookie(OIDC_STATE_COOKIE, path=OIDC_PATH, secure=site.secure, httponly=True, samesite="lax")
            return refused
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(OIDC_STATE_COOKIE, path=OIDC_PATH, secure=site.secure, httponly=True, samesite="lax")
        return await signed_in_as(user_id, response=response)

    async def me(request: Request) -> Response:
        if (session := await site.session(request)) is None:
            if site.oidc is not None:  # the page offers it beside the password form
                return JSONResponse(
                    {"error": "sign in first", "oidc": {"start": f"{OIDC_PATH}/start", "host": site.oidc.host}},
                    status_code=401,
                )
            return _error(401, "sign in first")
        quota, styles = await _quota(site, session.user_id), await _styles(site)
        return JSONResponse(
            {
                "user": session.user_id,
                "csrf": session.csrf,
                "quota": quota,
                "styles": styles,
                "sizes": _sizes(site),
                "text_size": _text_size(site),
            }
        )

    @signed_in
    async def credentials(request: Request, user_id: str) -> Response:
        """The signed-in user's own NATS credential, for `kiln login`: the permissions
        `kiln accounts add-user` gives (infra.nats_auth.user_permissions), for an hour."""
        if site.mint_credentials is None:
            return _error(
                404, "this Kiln's NATS has no authentication (KILN_NATS_AUTH=off): the CLI needs no credential"
            )
        now = time.time()
        return JSONResponse(
            {
                "user": user_id,
                "credentials": site.mint_credentials(user_id, CLI_CREDENTIAL_TTL_S),
                "expires_at": expiry(now, CLI_CREDENTIAL_TTL_S),
                "command": "kiln login kiln.creds",
            },
            headers={"Cache-Control": "no-store"},  # a secret: no cache keeps a copy
        )

    # -- generating ------------------------------------------------------------------------

    @signed_in
    async def generate(request: Request, user_id: str) -> Response:
        try:
            body = await _body(request, GenerateBody)
            submission = PromptSubmitted(
                request_id=uuid.uuid4().hex,
                user_id=user_id,
                conversation_id=body.conversation_id,
                prompt=body.prompt,
                width=body.size,
                height=body.size,
                steps=body.steps,
                style=body.style,
                edit_of=body.edit_of,
                strength=body.strength,
            )
            check_ids(submission)
        except (msgspec.DecodeError, ValueError) as error:
            return _error(400, str(error))
        lines: asyncio.Queue[dict | None] = asyncio.Queue()
        task = asyncio.create_task(_follow(site, submission, lines))
        return StreamingResponse(_ndjson(lines, task), media_type="application/x-ndjson")

    @signed_in
    async def conversation(request: Request, user_id: str) -> Response:
        conversation_id = request.path_params["conversation_id"]
        if not ID_PATTERN.match(conversation_id):
            return _error(400, f"not a conversation id: {conversation_id!r}")
        client = site.client
        turns = await client.conversation(user_id, conversation_id)
        outcomes = await asyncio.gather(*(client.recorded_outcome(user_id, t.request_id) for t in turns))
        return JSONResponse(
            [
                {
                    "request_id": turn.request_id,
                    "prompt": turn.prompt,
                    "composition": msgspec.to_builtins(turn.composition),
                    **(_outcome_line(site, outcome) if outcome else {"event": "pending"}),
                }
                for turn, outcome in zip(turns, outcomes, strict=True)
            ]
        )

    @signed_in
    async def share(request: Request, user_id: str) -> Response:
        request_id = request.path_params["request_id"]
        try:
            body = await _body(request, ShareBody)
        except msgspec.DecodeError as error:
            return _error(400, str(error))
        ttl_s = body.ttl_s if body.ttl_s is not None else site.links.share_ttl_s
        if not (1 <= ttl_s <= MAX_SHARE_TTL_S):
            return _error(400, f"ttl_s must be between 1 and {MAX_SHARE_TTL_S} seconds")
        if not ID_PATTERN.match(request_id) or await site.records.get(user_id, request_id) is None:
            return _error(404, f"you have no image from request {request_id}")
        share_id, now = await site.records.share(user_id, request_id), time.time()
        return JSONResponse({"url": site.links.share(share_id, now, ttl_s), "expires_at": expiry(now, ttl_s)})

    # -- images and share pages ------------------------------------------------------------

    async def image(request: Request) -> Response:
        user_id, request_id = request.path_params["user_id"], request.path_params["request_id"]
        for name, value in (("user", user_id), ("request", request_id)):
            if not ID_PATTERN.match(value):
                return _error(400, f"not a {name} id: {value!r}")
        query = request.query_params
        if "sig" in query or "exp" in query:
            purpose = "share" if query.get("p") == "share" else "download"
            try:
                site.links.signer.check(
                    purpose, image_subject(user_id, request_id), query.get("exp"), query.get("sig"), time.time()
                )
            except LinkError as error:
                return _error(error.status, str(error))
        elif (viewer := await site.session(request)) is None:
            return _error(403, "sign in, or use the image's signed link")
        elif viewer.user_id != user_id:
            return _error(403, "this image is not yours; its owner can share it with you")
        return await _png(site, user_id, request_id, download="download" in query)

    def shared_check(request: Request) -> str:
        """The share id of a share link, if its signature holds; LinkError if not."""
        share_id, query = request.path_params["share_id"], request.query_params
        if not ID_PATTERN.match(share_id):
            raise LinkError("the link is incomplete or altered")
        site.links.signer.check("share", share_subject(share_id), query.get("exp"), query.get("sig"), time.time())
        return share_id

    async def share_image(request: Request) -> Response:
        try:
            shared = await site.records.shared(shared_check(request))
        except LinkError as error:
            return _error(error.status, str(error))
        if shared is None:
            return _error(404, "the image this link names is gone")
        return await _png(site, shared.user_id, shared.request_id, download=False)

    async def share_page(request: Request) -> Response:
        try:
            share_id = shared_check(request)
        except LinkError as error:
            return _page(error.status, "This link does not open", str(error))
        shared = await site.records.shared(share_id)
        record = await site.records.get(shared.user_id, shared.request_id) if shared else None
        if record is None:
            return _page(404, "No such image", "The image this link names is gone.")
        query = request.query_params
        image_url = f"/share/{share_id}/image.png?exp={query['exp']}&sig={query['sig']}"
        style = (
            f" · style: {html.escape(record.composition.style)}"
            if record.composition and record.composition.style
            else ""
        )
        body = (
            f'<img id="shared-image" src="{html.escape(image_url)}" alt="{html.escape(record.prompt)}">'
            f'<p class="prompt" id="shared-prompt">{html.escape(record.prompt)}</p>'
            f'<p class="meta">{record.width}×{record.height} · {record.created_at:%Y-%m-%d %H:%M} UTC{style}</p>'
        )
        return _page(200, "Shared from Kiln", body, raw=True)

    # The page's default steps are the platform's (shared.events), not a second copy.
    page = (PLAYGROUND / "index.html").read_text().replace("__DEFAULT_STEPS__", str(DEFAULT_STEPS))

    async def playground(request: Request) -> Response:
        return HTMLResponse(page)

    async def healthz(request: Request) -> Response:
        ok = site.bus.is_connected
        return JSONResponse({"nats": "connected" if ok else "disconnected"}, status_code=200 if ok else 503)

    async def too_large(request: Request, error: Exception) -> Response:
        return _error(413, str(error.detail) if isinstance(error, TooLarge) else "the request body is too large")

    return Starlette(
        routes=[
            Route("/", playground),
            Mount("/static", StaticFiles(directory=PLAYGROUND), name="static"),
            Route("/api/signup", signup, methods=["POST"]),
            Route("/api/login", login, methods=["POST"]),
            Route("/api/logout", logout, methods=["POST"]),
            Route(f"{OIDC_PATH}/start", oidc_start),
            Route(f"{OIDC_PATH}/callback", oidc_callback),
            Route("/api/me", me),
            Route("/api/credentials", credentials, methods=["POST"]),
            Route("/api/generate", generate, methods=["POST"]),
            Route("/api/conversations/{conversation_id}", conversation),
            Route("/api/images/{request_id}/share", share, methods=["POST"]),
            Route("/images/{user_id}/{request_id}.png", image),
            Route("/share/{share_id}", share_page),
            Route("/share/{share_id}/image.png", share_image),
            Route("/healthz", healthz),
        ],
        middleware=[Middleware(Hardened, public_url=site.settings.base_url)],
        exception_handlers={TooLarge: too_large},
    )


async def _png(site: Site, user_id: str, request_id: str, *, download: bool) -> Response:
    try:
        result = await site.store.get(f"{user_id}/{request_id}.png")
    except ObjectNotFoundError:
        return _error(404, f"no image for request {request_id}")
    headers = {"Cache-Control": "private, max-age=3600"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="kiln-{request_id}.png"'
    return Response(result.data, media_type="image/png", headers=headers)


async def _follow(site: Site, submission: PromptSubmitted, lines: asyncio.Queue[dict | None]) -> None:
    """Publish the prompt through the SDK and queue what happens to it as lines; the last
    line is always queued, so the stream ends whatever happens here."""
    try:
        lines.put_nowait(await _outcome_of(site, submission, lines))
        lines.put_nowait({"event": "quota", "quota": await _quota(site, submission.user_id)})
    finally:
        lines.put_nowait(None)


async def _outcome_of(site: Site, submission: PromptSubmitted, lines: asyncio.Queue[dict | None]) -> dict:
    # The playground's span is the root of the request's trace, as the CLI's is.
    attributes = {"kiln.request_id": submission.request_id, **user_attributes(submission.user_id)}
    with tracer.start_as_current_span("playground generate", kind=trace.SpanKind.SERVER, attributes=attributes) as span:
        trace_id = trace_id_of(span)
        lines.put_nowait(
            {
                "event": "accepted",
                "request_id": submission.request_id,
                "trace_id": trace_id,
                "trace_url": site.settings.trace_link(trace_id),
            }
        )

        def on_progress(event: RenderProgress) -> None:
            lines.put_nowait(
                {
                    "event": "progress",
                    "state": event.state,
                    "step": event.step,
                    "total": event.total_steps,
                    "queue_position": event.queue_position,
                    "eta_s": event.eta_s,
                }
            )

        try:
            outcome = await site.client.generate(
                submission.prompt,
                user_id=submission.user_id,
                conversation_id=submission.conversation_id,
                request_id=submission.request_id,
                width=submission.width,
                height=submission.height,
                steps=submission.steps,
                style=submission.style,
                edit_of=submission.edit_of,
                strength=submission.strength,
                on_progress=on_progress,
                timeout_s=GENERATE_TIMEOUT_S,
            )
        except (TimeoutError, nats.errors.Error) as error:
            detail = f"{error or type(error).__name__}; the request may still finish: reload to see it"
            return {"event": "error", "request_id": submission.request_id, "detail": detail}
        except Exception as error:  # the stream's boundary: say it, never leave the page waiting
            log.exception("following %s", submission.request_id)
            return {"event": "error", "request_id": submission.request_id, "detail": f"{type(error).__name__}: {error}"}
        return {"request_id": submission.request_id, **_outcome_line(site, outcome)}


async def _ndjson(lines: asyncio.Queue[dict | None], task: asyncio.Task):
    try:
        while (line := await lines.get()) is not None:
            yield msgspec.json.encode(line) + b"\n"
    finally:
        # The browser went away: stop following. The request goes on; its outcome stays
        # readable through /api/conversations.
        task.cancel()


def _outcome_line(site: Site, outcome: Outcome) -> dict:
    if isinstance(outcome, ImageDelivered):
        # The link is signed as the outcome is served: the stored outcome holds none.
        return {
            "event": "delivered",
            "url": site.links.download(outcome.user_id, outcome.request_id, time.time()),
            "image": f"/images/{outcome.user_id}/{outcome.request_id}.png",
            "prompt": outcome.prompt,
            "composition": msgspec.to_builtins(outcome.composition),
            "render_ms": outcome.render_ms,
        }
    if isinstance(outcome, QuotaDenied):
        retry_at = outcome.retry_at.isoformat() if outcome.retry_at else None
        return {"event": "denied", "reason": outcome.reason, "detail": outcome.detail, "retry_at": retry_at}
    return {"event": "failed", "stage": outcome.stage, "reason": outcome.reason, "detail": outcome.detail}


async def _quota(site: Site, user_id: str) -> dict | None:
    try:
        status = await site.client.quota(user_id, timeout_s=2)
    except (ServiceUnavailable, nats.errors.Error) as error:
        log.warning("quota status for %s: %s", user_id, error)
        return None  # the page says "quota unknown"; the rest works
    return {**msgspec.to_builtins(status), "left": status.left}


def _sizes(site: Site) -> list[int]:
    """The sides the size menu offers: the model's native ones (its card), as quota accepts."""
    try:
        return model_card.load(site.settings.model_path).offered_sides()
    except model_card.CardError as error:
        log.warning("sizes: %s", error)
        return [DEFAULT_SIZE]  # the page still works; quota names the sizes if this is wrong


def _text_size(site: Site) -> int | None:
    """The side a prompt quoting text is drawn at (its text model's), None: no text model."""
    try:
        card = model_card.text_card(site.settings.model_path)
    except model_card.CardError as error:
        log.warning("text size: %s", error)
        return None
    return max(card.sizes) if card is not None and card.sizes else None


async def _styles(site: Site) -> dict[str, str]:
    try:
        return await site.client.styles(timeout_s=2)
    except (ServiceUnavailable, nats.errors.Error) as error:
        log.warning("styles: %s", error)
        return {}


def _page(status: int, title: str, body: str, raw: bool = False) -> HTMLResponse:
    content = body if raw else f'<p class="error">{html.escape(body)}</p>'
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><link rel=stylesheet href=/static/app.css></head>"
        f"<body class=share><main><h1>{html.escape(title)}</h1>{content}</main></body></html>",
        status_code=status,
    )
