"""CORS for browser SDKs: preflights answered without auth, and the headers every answer on a
route with `cors` carries for a listed origin."""

from __future__ import annotations

from gateway.auth.target import Target
from gateway.config.router import Router
from gateway.config.routes import Route
from gateway.http.messages import Request, Response, date_line, header_lines
from gateway.refusals.reasons import Rejected


def preflight(request: Request, router: Router[Route], target: Target) -> Response | None:
    """The 204 for a preflight from a listed origin, about the route the asked method would
    reach; None for anything else that uses OPTIONS, which is routed like any other method."""
    origin = request.header("origin")
    asked = request.header("access-control-request-method")
    if origin is None or not asked:
        return None
    try:
        route, _ = router.match(asked.strip(), target.path)
    except Rejected:  # no route for that method: the browser is told nothing
        return None
    cors = route.cors
    if cors is None or origin not in cors.origins:
        return None
    headers = header_lines(cors.preflight_headers(origin).items())
    headers.append(date_line())
    return Response(204, headers)


def cors_headers(route: Route, request: Request) -> dict[str, str] | None:
    if route.cors is None:
        return None
    return route.cors.answer_headers(request.header("origin"))
