"""The gateway's own answer to a refused request, with the headers every answer carries."""

from __future__ import annotations

from gateway.http.messages import Response, date_line, header_lines
from gateway.refusals.answers import ErrorFormat, render_error
from gateway.refusals.reasons import Reason
from gateway.stages.exchange import Exchange


def refusal(
    reason: Reason,
    exchange: Exchange,
    *,
    cause: Reason | None = None,
    retry_after: int | None = None,
    allow: str | None = None,
) -> Response:
    """The answer for `reason` (recorded as the exchange's), in the route's error format; the
    reason table says whether the connection closes after it."""
    exchange.reason = reason
    route = exchange.route
    answer = render_error(
        reason,
        exchange.request_id,
        error_format=route.error_format if route else ErrorFormat.STANDARD,
        cause=cause,
        retry_after=retry_after,
        allow=allow,
    )
    owned = [*answer.headers.items(), ("X-Request-Id", exchange.request_id)]
    if exchange.cors_headers:
        owned += exchange.cors_headers.items()
    headers = header_lines(owned)
    headers.append(date_line())
    return Response(answer.status, headers, answer.body, close=reason.closes)
