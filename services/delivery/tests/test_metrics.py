import pytest
from starlette.responses import Response
from starlette.routing import Mount, Route

from services.delivery.metrics import route_template


async def _ok(request):
    return Response()


ROUTES = [
    Route("/", _ok),
    Mount("/static", routes=[]),
    Route("/api/generate", _ok, methods=["POST"]),
    Route("/images/{user_id}/{request_id}.png", _ok),
]


@pytest.mark.parametrize(
    ("method", "path", "template"),
    [
        ("GET", "/images/alice/3f2a.png", "/images/{user_id}/{request_id}.png"),
        ("GET", "/static/app.js", "/static"),
        ("GET", "/api/generate", "/api/generate"),  # the route, another method: a 405 of its own
        ("GET", "/images/alice", "unmatched"),  # a 404 never labels its path
    ],
)
def test_a_request_is_labelled_by_its_route_template_never_its_path(method: str, path: str, template: str):
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}
    assert route_template(ROUTES, scope) == template
