"""What the HTTP layer raises, for the layer above to turn into its own answers."""

from __future__ import annotations

import asyncio


class RequestBodyError(Exception):
    """The request's body could not be read whole."""


class BodyTooLarge(RequestBodyError):
    """Past the connection's body limit, declared or sent."""


class BodyTimeout(RequestBodyError):
    """The body did not arrive in the time it was given."""


class BodyBroken(RequestBodyError):
    """Bad framing, or the client went away mid-body."""


class UpstreamUnreachable(Exception):
    """No connection to the upstream within the connect timeout: refused, unresolvable, or
    every pooled connection busy for that long. Nothing was sent."""


class UpstreamBroken(Exception):
    """The upstream sent something that is not one well-formed HTTP/1.1 answer."""


# Everything a broken or vanished upstream raises mid-exchange, besides TimeoutError (past the
# exchange's deadline; a subclass of OSError, so tell it apart first).
UPSTREAM_FAILURES = (
    UpstreamBroken,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    OSError,
)
