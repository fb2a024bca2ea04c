"""CORS for browser SDKs: preflights answered without auth, and the headers every answer on a
route with `cors` carries for a listed origin."""

from __future__ import annotations

from gateway.auth.target import Target
from gateway.config.router import Router
from gateway.config.routes import Route
from gateway.http.messages import Request, Response, date_line, header_lines


def preflight(request: Request, router: Router[Route], target: Target) -> Response | None:
    """The 204 for a preflight from a listed origin; None for anything else that uses
    OPTIONS, which is routed like any other method."""
    found = router.first_for_path(target.path)
    origin = request.header("origin")
    if found is None or found[0].cors is None or origin is None:
        return None
    cors = found[0].cors
    if origin not in cors.origins or not request.header_values("access-control-request-method"):
        return None
    headers = header_lines(cors.preflight_headers(origin).items())
    headers.append(date_line())
    return Response(204, headers)


def cors_headers(route: Route, request: Request) -> dict[str, str] | None:
    if route.cors is None:
        return None
    return route.cors.answer_headers(request.header("origin"))
