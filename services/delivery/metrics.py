"""delivery's Prometheus metrics (served on KILN_METRICS_PORT, see shared/telemetry.py).

delivery ends every request that reaches render, so it records the outcomes it publishes
and each one's end-to-end latency: from the prompt's submission (in quota's grant) to the
outcome. Its HTTP server's requests are counted by route template and status, never by
path: a path holds user and request ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from opentelemetry import metrics
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.events import ImageDelivered, QuotaGranted, RequestFailed
from shared.telemetry import SECONDS_UP_TO_10_MIN

meter = metrics.get_meter("kiln.delivery")

outcomes = meter.create_counter(
    "kiln_delivery_outcomes", description="Render results turned into outcomes: delivered or failed"
)
latency_seconds = meter.create_histogram(
    "kiln_request_latency",
    unit="s",
    description="From a prompt's submission to its outcome, for requests that reach render, by plan, tier and outcome",
    explicit_bucket_boundaries_advisory=SECONDS_UP_TO_10_MIN,
)
http_requests = meter.create_counter(
    "kiln_http_requests", description="HTTP requests to delivery, by method, route template and status"
)
http_seconds = meter.create_histogram(
    "kiln_http_request_duration",
    unit="s",
    description="HTTP request time to the response's last byte (a playground generate streams until its outcome)",
    explicit_bucket_boundaries_advisory=SECONDS_UP_TO_10_MIN,
)

# Any other method counts as "other": a client may send any token, and each would be a series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def count_outcome(outcome: ImageDelivered | RequestFailed, grant: QuotaGranted | None) -> None:
    """An outcome delivery published; with its grant (None: none recorded, a job queued by
    hand, say), its latency too."""
    kind = "delivered" if isinstance(outcome, ImageDelivered) else "failed"
    outcomes.add(1, {"outcome": kind})
    if grant is None:
        return
    ended = outcome.delivered_at if isinstance(outcome, ImageDelivered) else outcome.failed_at
    # `submitted_at` is the client's clock: one running ahead must not start the request
    # after quota decided it.
    submitted = min(grant.submission.submitted_at, grant.decided_at)
    seconds = max(0.0, (ended - submitted).total_seconds())
    latency_seconds.record(seconds, {"plan": grant.plan, "tier": grant.tier, "outcome": kind})


def route_template(routes: Iterable[BaseRoute], scope: Scope) -> str:
    """The template of the route a request goes to (`/images/{user_id}/{request_id}.png`),
    matched as Starlette's router matches it; "unmatched" for none."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return getattr(route, "path", "unmatched")
        if match is Match.PARTIAL and partial is None:  # the path, another method: a 405
            partial = getattr(route, "path", "unmatched")
    return partial or "unmatched"


class HttpMetrics:
    """ASGI middleware counting each HTTP request and timing it. Written here, not taken
    from opentelemetry-instrumentation-starlette: that one also starts a server span per
    request (every image fetch a trace of its own) and labels host, port and flavour."""

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.routes = list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = route_template(self.routes, scope)  # before the router rewrites the scope
        status = 500  # unless the app answers: it raised before a response started

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            labels = {"method": method, "route": route, "status": str(status)}
            http_requests.add(1, labels)
            http_seconds.record(time.perf_counter() - started, labels)
