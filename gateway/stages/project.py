"""Which project a request is for: `{project}` in the path, a header, or the route's fixed id."""

from __future__ import annotations

from gateway.auth.extract import RequestParts
from gateway.config.routes import ProjectFixed, ProjectFromHeader, Route
from gateway.refusals.reasons import Reason, Rejected


def project_id(route: Route, params: dict[str, str], parts: RequestParts) -> str:
    source = route.project_from
    if isinstance(source, ProjectFixed):
        return source.id
    if isinstance(source, ProjectFromHeader):
        values = parts.headers.get(source.name)
        if values and len(values) > 1:
            raise Rejected(Reason.PROJECT_HEADER_DUPLICATE)
        if not values or not values[0].strip():
            raise Rejected(Reason.PROJECT_HEADER_MISSING)
        return values[0].strip()
    return params[source.group]
