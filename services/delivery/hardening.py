"""What every response and every request of delivery's HTTP side goes through, before any
route: security headers, a same-origin check on state-changing requests, and a body limit.

Written as one small ASGI middleware rather than taken from a library: Starlette has none of
the three (its TrustedHost and CORS middlewares check other things), and each is a few lines.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 64 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# No inline script or style anywhere (the playground's are files under /static), so 'self'
# is enough; nothing may frame a page (clickjacking), nor post a form elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
    # Not no-referrer: under it a browser sends `Origin: null` even on a same-origin POST,
    # which the origin check would refuse. same-origin still keeps a link's signature from
    # leaving the site in a Referer.
    "Referrer-Policy": "same-origin",
}


class TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {limit // 1024} KiB")


class Hardened:
    """ASGI middleware. `public_url`: the origin the service is published at (besides the
    one the request's Host names)."""

    def __init__(self, app: ASGIApp, public_url: str, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.public_origin = _origin(public_url)
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        headers = Headers(scope=scope)
        # 1. A state-changing request must come from a page of this site (CSRF, first line;
        #    the session's token is the second, checked by the route).
        if scope["method"] not in SAFE_METHODS and not self._same_origin(scope, headers):
            refused = JSONResponse({"error": "cross-site request refused: send it from the playground's own page"}, 403)
            await refused(scope, receive, send_with_headers)
            return
        # 2. The body limit: a declared length is refused before it is read; a chunked body
        #    (no length) is counted as it comes and refused once past the limit.
        length = headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > self.max_body):
            await _too_large(self.max_body)(scope, receive, send_with_headers)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise TooLarge(self.max_body)  # answered by the app's exception handler
            return message

        await self.app(scope, receive_limited, send_with_headers)

    def _same_origin(self, scope: Scope, headers: Headers) -> bool:
        origin = headers.get("origin")
        if not origin or origin == "null":
            return False
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        return origin in (own, self.public_origin)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": TooLarge(limit).detail}, 413)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
