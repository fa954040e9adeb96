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
from shared.subjects import image_key


def create_app(bus: Bus, store: ObjectStore) -> Starlette:
    async def image(request: Request) -> Response:
        user_id, request_id = request.path_params["user_id"], request.path_params["request_id"]
        for name, value in (("user", user_id), ("request", request_id)):
            if not ID_PATTERN.match(value):
                return JSONResponse({"error": f"not a {name} id: {value!r}"}, status_code=400)
        try:
            result = await store.get(image_key(user_id, request_id))
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
            Route("/images/{user_id}/{request_id}.png", image),
            Route("/healthz", healthz),
        ]
    )
