"""Forwarding to the tracking API and relaying its answer unchanged (SPEC §5).

One pooled client session for the process. An upstream that cannot be reached, times out or
breaks mid-answer is a 502/504 from us, never a 2xx: the SDK keeps its batch and retries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus

from yarl import URL

from gateway.config import UpstreamSettings
from gateway.extract import normalise_header_name
from gateway.http1 import UPSTREAM_FAILURES, Answer, Client, ConnectionPool
from gateway.messages import http_date
from gateway.reasons import Reason, Rejected

# Hop-by-hop (RFC 9110 §7.6.1) plus what the gateway sets or owns itself.
_REQUEST_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-auth-status",
        "x-authenticated-user",
    }
)
_RESPONSE_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _connection_named(values: Iterable[str]) -> set[str]:
    return {normalise_header_name(n.strip()) for v in values for n in v.split(",") if n.strip()}


def is_trusted(address: str | None, trusted: Sequence[IPNetwork]) -> bool:
    if not trusted or address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str | None:
    """The first address, from the right, that is not one of our trusted proxies."""
    if not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for v in forwarded_for for h in v.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def strip_query(raw_query: str | None, names: frozenset[str]) -> str | None:
    """The raw query without the named parameters (read as the upstream decodes names)."""
    if not raw_query or not names:
        return raw_query
    kept = [p for p in raw_query.split("&") if unquote_plus(p.partition("=")[0]) not in names]
    return "&".join(kept) if kept else None


@dataclass(frozen=True, slots=True)
class Forwarding:
    """What the gateway adds to, or removes from, a request it forwards."""

    request_id: str
    auth_status: str
    authenticated_user: str | None
    peer: str | None
    peer_trusted: bool
    drop: frozenset[str]  # further normalised names: token headers, a decoded Content-Encoding
    token_scheme_drop: frozenset[tuple[str, str]]  # (name, scheme): only values with that scheme


_FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})


def forward_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], forwarding: Forwarding
) -> list[tuple[str, str]]:
    """The request's headers as the upstream gets them, in one pass over what was received."""
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    kept_forwarded: dict[str, str] = {}
    connection_named: set[str] = set()
    host = ""
    drop, scheme_drop, trusted = (
        forwarding.drop,
        forwarding.token_scheme_drop,
        forwarding.peer_trusted,
    )
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("utf-8", "surrogateescape")
        key = name.lower()
        if "_" in key:
            key = key.replace("_", "-")  # CGI-style servers read X_Auth_Status as X-Auth-Status
        if key in _FORWARDING:
            if trusted:
                if key == "x-forwarded-for":
                    forwarded_for.append(value)
                elif key == "forwarded":
                    out.append((name, value))
                else:
                    kept_forwarded.setdefault(key, value)
            continue
        if key in _REQUEST_DROPPED or key in drop:
            if key == "connection":
                connection_named |= _connection_named((value,))
            elif key == "host":
                host = host or value
            continue
        if scheme_drop and any(
            key == n and value.strip().lower().startswith(s + " ") for n, s in scheme_drop
        ):
            continue
        out.append((name, value))
    if connection_named:  # headers the client marked hop-by-hop, wherever they came
        out = [(n, v) for n, v in out if normalise_header_name(n) not in connection_named]
    forwarded_for.append(forwarding.peer or "unknown")
    out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", kept_forwarded.get("x-forwarded-proto", "http")))
    out.append(("X-Forwarded-Host", kept_forwarded.get("x-forwarded-host", host)))
    out.append(("X-Request-Id", forwarding.request_id))
    out.append(("X-Auth-Status", forwarding.auth_status))
    if forwarding.authenticated_user is not None:
        out.append(("X-Authenticated-User", forwarding.authenticated_user))
    return out


def response_headers(
    headers: Iterable[tuple[str, str]], owned: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The upstream's headers without hop-by-hop ones, with the gateway's `owned` headers in
    place of any the upstream sent under those names, and a `Date` if the upstream sent none."""
    pairs = list(headers)
    connection_named = _connection_named(v for n, v in pairs if n.lower() == "connection")
    replaced = {name.lower() for name, _ in owned}
    out: list[tuple[str, str]] = []
    dated = False
    for name, value in pairs:
        key = name.lower()
        if key in _RESPONSE_DROPPED or key in connection_named or key in replaced:
            continue
        dated = dated or key == "date"
        out.append((name, value))
    out += owned
    if not dated:
        out.append(http_date())
    return out


class Upstream:
    """The pooled HTTP/1.1 client to the tracking API."""

    # An answer up to this size is read whole before we reply, so an upstream that breaks
    # mid-answer still gets a 502 rather than a truncated 2xx.
    BUFFER_BYTES = 1 << 20

    def __init__(self, settings: UpstreamSettings) -> None:
        url = URL(settings.url)
        self._prefix = url.raw_path.rstrip("/")  # validated: http://host[:port][/prefix]
        assert url.host is not None
        host_header = url.raw_host or url.host
        if url.explicit_port:
            host_header = f"{host_header}:{url.port}"
        self._pool = ConnectionPool(
            url.host, url.port or 80, settings.max_connections, settings.connect_timeout_seconds
        )
        self._client = Client(self._pool, host_header, settings.timeout_seconds, self.BUFFER_BYTES)

    async def close(self) -> None:
        await self._pool.close()

    async def send(
        self, method: str, path: str, query: str | None, headers: list[tuple[str, str]], body: bytes
    ) -> Answer:
        # Path and query were validated as plain RFC 3986 text: sent exactly as received.
        target = self._prefix + path if query is None else f"{self._prefix}{path}?{query}"
        try:
            answer = await self._client.request(method, target, headers, body)
        except TimeoutError:
            raise Rejected(Reason.UPSTREAM_TIMEOUT) from None
        except UPSTREAM_FAILURES:
            raise Rejected(Reason.UPSTREAM_BROKEN) from None
        return answer
