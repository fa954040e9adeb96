"""delivery's HTTP side (Starlette): image download and health."""

from __future__ import annotations

from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.bus import Bus
from shared.events import ID_PATTERN


def create_app(bus: Bus, store: ObjectStore) -> Starlette:
    async def image(request: Request) -> Response:
        request_id = request.path_params["request_id"]
        if not ID_PATTERN.match(request_id):
            return JSONResponse({"error": f"not a request id: {request_id!r}"}, status_code=400)
        try:
            result = await store.get(f"{request_id}.png")
        except ObjectNotFoundError:
            return JSONResponse({"error": f"no image for request {request_id}"}, status_code=404)
        return Response(
            result.data,
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=31536000, immutable"},
        )

    async def healthz(request: Request) -> Response:
        ok = bus.nc.is_connected
        return JSONResponse({"nats": "connected" if ok else "disconnected"}, status_code=200 if ok else 503)

    return Starlette(
        routes=[
            Route("/images/{request_id}.png", image),
            Route("/healthz", healthz),
        ]
    )
