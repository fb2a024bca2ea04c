"""What the HTTP layer raises, for the layer above to turn into its own answers."""

from __future__ import annotations

import asyncio
from typing import Final


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
UPSTREAM_FAILURES: Final = (
    UpstreamBroken,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    OSError,
)


class HeadRefused(Exception):
    """A request head llhttp read but HTTP/1.1 does not allow (RFC 9112 §3.2, §2.3): answered
    in its turn, then the connection closes."""


class HostInvalid(HeadRefused):
    """No `Host` on an HTTP/1.1 request, or more than one: which host is meant has two answers."""


class VersionUnsupported(HeadRefused):
    """A version other than HTTP/1.0 and 1.1, such as HTTP/2.0 spoken as text: 505."""


class ObsoleteVersion(HeadRefused):
    """HTTP/0.9: a request line without a version, which nothing here answers."""
