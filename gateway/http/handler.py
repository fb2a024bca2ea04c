"""What the HTTP layer asks of the application it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.http.messages import Request, Response


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_field_bytes: int  # the request target, or one header's name or value
    max_body_bytes: int
    max_connections: int  # past it, a new connection is closed at once
    idle_timeout_seconds: float  # without a request head, or with output the client never takes


class Handler(Protocol):
    stopping: bool  # the connection closes after the answer under way

    @property
    def limits(self) -> ConnectionLimits: ...

    async def handle(self, request: Request) -> Response: ...

    def unparsable(self, remote: str | None, error: str, *, version_unsupported: bool) -> Response:
        """The answer to bytes the parser refused (`error` names the parser's exception, never
        the bytes; `version_unsupported`: a version other than HTTP/1.0 and 1.1, which is 505
        rather than 400); the connection closes after it."""
        ...

    def failed(self) -> Response:
        """The answer when `handle` raised; called inside the `except`, so the handler can log
        the exception. The connection closes after it."""
        ...


class ConnectionCounts(Protocol):
    """Where a listener reports its connections."""

    def connections_open(self, count: int) -> None: ...

    def connection_refused(self, reason: str) -> None:
        """`limit` (past `max_connections`) or `accept_error` (accept failed, e.g. EMFILE)."""
        ...
