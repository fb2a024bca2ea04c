"""The tracking API as the pipeline sees it: one pooled HTTP/1.1 client for the process, and the
one place where what the transport raises becomes a reason.

An upstream that cannot be reached, times out or breaks mid-answer is a 502/504 from us, never
a 2xx: the SDK keeps its batch and retries.
"""

from __future__ import annotations

import ssl
from collections.abc import Coroutine
from typing import Any, Final

from yarl import URL

from gateway.config.settings import UpstreamSettings
from gateway.http.client import Answer, Client
from gateway.http.errors import UPSTREAM_FAILURES, UpstreamUnreachable
from gateway.http.outbox import Outbox
from gateway.http.pool import ConnectionPool, Destination
from gateway.refusals.reasons import Reason

# What an exchange with the upstream may raise.
FAILURES: Final = (UpstreamUnreachable, TimeoutError, *UPSTREAM_FAILURES)


def failure_reason(exc: BaseException) -> Reason:
    """Why an exchange that raised `exc` (one of `FAILURES`) before its answer began failed."""
    if isinstance(exc, UpstreamUnreachable):
        return Reason.UPSTREAM_CONNECT  # nothing was sent: the SDK may retry at once
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        return Reason.UPSTREAM_TIMEOUT
    return Reason.UPSTREAM_BROKEN


def relay_failure_reason(exc: BaseException) -> Reason:
    """Why an answer relayed as it arrived was cut: once its head is sent, whatever broke
    (the upstream, or its deadline), the answer is a broken one."""
    return Reason.UPSTREAM_BROKEN if isinstance(exc, FAILURES) else Reason.INTERNAL


def _endpoints(endpoints: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """HOST:PORT (validated) as a host and a port; `[v6]:port` without its brackets."""
    parsed = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        parsed.append((host.strip("[]"), int(port)))
    return tuple(parsed)


# An answer up to this size is read whole before we reply, so an upstream that breaks
# mid-answer still gets a 502 rather than a truncated 2xx.
BUFFER_BYTES: Final = 1 << 20


class Upstream:
    """The pooled HTTP/1.1 client to the tracking API."""

    def __init__(
        self, name: str, settings: UpstreamSettings, tls: ssl.SSLContext | None, outbox: Outbox
    ) -> None:
        self.name = name
        self.settings = settings
        self.tls = tls
        url = URL(settings.url)
        self._prefix = url.raw_path.rstrip("/")  # validated: http(s)://host[:port][/prefix]
        assert url.host is not None
        assert url.port is not None
        host_header = url.raw_host or url.host
        if url.explicit_port:
            host_header = f"{host_header}:{url.port}"
        self._pool = ConnectionPool(
            Destination(
                url.host, url.port, tls, settings.server_name, _endpoints(settings.endpoints)
            ),
            settings.max_connections,
            settings.connect_timeout_seconds,
            settings.timeout_seconds,
            settings.idle_timeout_seconds,
            outbox,
        )
        self._client = Client(self._pool, host_header, BUFFER_BYTES)

    async def close(self) -> None:
        await self._pool.close()

    def send(
        self, method: str, path: str, query: str | None, header_lines: list[bytes], body: bytes
    ) -> Coroutine[Any, Any, Answer]:
        """The exchange, to await; it raises one of `FAILURES` (`failure_reason` says which
        answer each one is). Not wrapped in a coroutine of ours that would map them: that
        would cost one more frame per request."""
        # Path and query were validated as plain RFC 3986 text: sent exactly as received.
        target = self._prefix + path if query is None else f"{self._prefix}{path}?{query}"
        return self._client.request(method, target, header_lines, body)
