"""The delivery application: a render result in, the request's outcome out; a download link
signed for whoever asks for their image; and the HTTP side (images, share pages, the
playground) served beside it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx
import msgspec
import nats.errors
import uvicorn
from opentelemetry import trace

from infra.nats_auth import account_key, mint_credentials, user_permissions
from services.delivery import metrics
from services.delivery.accounts import Accounts, Sessions
from services.delivery.http import MintCredentials, Site, create_app
from services.delivery.image_records import ImageRecord, ImageRecords
from services.delivery.links import Links, Signer, expiry, load_secret
from services.delivery.oidc import OpenIDProvider
from services.delivery.outcome import outcome
from shared import subjects
from shared.bus import Bus
from shared.events import ID_PATTERN, ImageDelivered, ImageLink, QuotaGranted, RenderCompleted, RenderFailed
from shared.records import read_outcome
from shared.settings import Settings


class Delivery:
    def __init__(self, bus: Bus, site: Site) -> None:
        self.bus = bus
        self.site = site

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, bus: Bus) -> AsyncIterator[Delivery]:
        links = Links(
            Signer(load_secret(settings.link_secret, settings.data_dir)),
            settings.base_url,
            settings.link_ttl_s,
            settings.share_ttl_s,
        )
        records = ImageRecords(await bus.key_value(subjects.IMAGE_RECORDS))
        accounts = Accounts(await bus.key_value(subjects.ACCOUNTS))
        sessions = Sessions(await bus.key_value(subjects.SESSIONS))
        store = await bus.object_store(subjects.IMAGES)
        site = Site(bus, store, records, links, settings, accounts, sessions, _credential_minter(settings))
        async with httpx.AsyncClient(timeout=10) as http:
            if settings.oidc_issuer and settings.oidc_client_id:
                site.oidc = OpenIDProvider(
                    settings.oidc_issuer,
                    settings.oidc_client_id,
                    settings.oidc_client_secret,
                    f"{settings.base_url}/api/oidc/callback",
                    sessions.kv,  # pending sign-ins, beside the sessions they become
                    http,
                )
            yield cls(bus, site)

    async def handle_render_event(self, event: RenderCompleted | RenderFailed) -> None:
        if isinstance(event, RenderCompleted):
            # Kept before the outcome goes out, so every delivered image has its record.
            with self.bus.tracer.start_as_current_span(
                "delivery record image",
                kind=trace.SpanKind.CLIENT,  # a call to the key-value bucket
                attributes={"kiln.bucket": subjects.IMAGE_RECORDS.name},
            ):
                await self.site.records.put(
                    ImageRecord(
                        user_id=event.user_id,
                        request_id=event.request_id,
                        conversation_id=event.conversation_id,
                        prompt=event.prompt,
                        composition=event.composition,
                        width=event.width,
                        height=event.height,
                        created_at=event.completed_at,
                    )
                )
        subject, result = outcome(event)
        if await self.bus.publish(subject, result, first_on_subject=True):
            metrics.count_outcome(result, await self._grant(event))

    async def answer_link(self, subject: str) -> ImageLink | dict[str, str]:
        """The answer to `kiln.delivery.link.<user>.<request>`: a download link for the
        request's image, signed now, or `{"error": …}` saying why not. The subject names the
        user, and a user's credential may ask only on its own subjects, so whoever asks is
        the image's owner (or a service acting for them, the playground)."""
        user_id = subjects.DELIVERY_LINK.value(subject, "user")
        request_id = subjects.DELIVERY_LINK.value(subject, "request")
        for name, value in (("user", user_id), ("request", request_id)):
            if not ID_PATTERN.match(value):
                return {"error": f"not a {name} id: {value!r}"}
        # Only a delivered image gets a link: one for a request that drew nothing opens nothing.
        delivered = await read_outcome(self.bus, user_id, request_id)
        if not isinstance(delivered, ImageDelivered):
            return {"error": f"request {request_id} of {user_id} has no delivered image"}
        links, now = self.site.links, time.time()
        return ImageLink(
            user_id=user_id,
            request_id=request_id,
            url=links.download(user_id, request_id, now),
            expires_at=datetime.fromtimestamp(expiry(now, links.download_ttl_s), UTC),
        )

    async def _grant(self, event: RenderCompleted | RenderFailed) -> QuotaGranted | None:
        """The request's grant, which holds its submission: for the latency metric only, so
        a failed look-up costs the one observation, not the outcome's handling."""
        try:
            stored = await self.bus.last_message(
                subjects.QUOTA, subjects.quota_decided(event.user_id, event.request_id)
            )
            decision = stored.event() if stored is not None else None
        except (TimeoutError, nats.errors.Error, msgspec.DecodeError):
            return None
        return decision if isinstance(decision, QuotaGranted) else None

    async def serve_http(self, stop: asyncio.Event) -> None:
        """The HTTP side, until `stop`."""
        settings = self.site.settings
        app = create_app(self.site)
        config = uvicorn.Config(
            metrics.HttpMetrics(app, app.routes),
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            lifespan="off",
        )
        http = _HttpServer(config)
        serving = asyncio.create_task(http.serve())
        await stop.wait()
        http.should_exit = True
        await serving


def _credential_minter(settings: Settings) -> MintCredentials | None:
    """Signed-in users' own NATS credentials, made with the `KILN` account's key, which only
    delivery among the services opens (the operator's it never does); None with auth off,
    or where Kiln's keys are not in this data folder."""
    key = account_key(settings.data_dir) if settings.nats_auth else None
    if key is None:
        return None
    return lambda user_id, ttl_s: mint_credentials(key, user_id, user_permissions(user_id), ttl_s)


class _HttpServer(uvicorn.Server):
    """Signals belong to the service runner (it sets `stop`); uvicorn must not take them."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()
