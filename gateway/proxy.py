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
from gateway.messages import date_line, header_lines
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
_RESPONSE_DROPPED_BYTES = frozenset(name.encode() for name in _RESPONSE_DROPPED)

_header_keys: dict[bytes, str] = {}  # a client's header names repeat: normalised once each
_HEADER_KEYS_KEPT = 4096


def _header_key(raw_name: bytes) -> str:
    """The name as the gateway compares it: lower case, `_` read as `-` (CGI-style servers
    read X_Auth_Status as X-Auth-Status)."""
    key = _header_keys.get(raw_name)
    if key is None:
        key = raw_name.decode("latin-1").lower().replace("_", "-")
        if len(_header_keys) < _HEADER_KEYS_KEPT:
            _header_keys[raw_name] = key
    return key


def forward_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], forwarding: Forwarding
) -> list[bytes]:
    """The request's headers as the upstream gets them ("Name: value" lines, the client's
    bytes unchanged), in one pass over what was received."""
    out: list[tuple[str, bytes]] = []
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
        key = _header_key(raw_name)
        if key in _FORWARDING:
            if trusted:
                value = raw_value.decode("utf-8", "surrogateescape")
                if key == "x-forwarded-for":
                    forwarded_for.append(value)
                elif key == "forwarded":
                    out.append((key, raw_name + b": " + raw_value))
                else:
                    kept_forwarded.setdefault(key, value)
            continue
        if key in _REQUEST_DROPPED or key in drop:
            if key == "connection":
                connection_named |= _connection_named((raw_value.decode("latin-1"),))
            elif key == "host":
                host = host or raw_value.decode("utf-8", "surrogateescape")
            continue
        if scheme_drop and any(
            key == n and raw_value.strip().lower().startswith(s.encode() + b" ")
            for n, s in scheme_drop
        ):
            continue
        out.append((key, raw_name + b": " + raw_value))
    if connection_named:  # headers the client marked hop-by-hop, wherever they came
        out = [(key, line) for key, line in out if key not in connection_named]
    forwarded_for.append(forwarding.peer or "unknown")
    added = [
        ("X-Forwarded-For", ", ".join(forwarded_for)),
        ("X-Forwarded-Proto", kept_forwarded.get("x-forwarded-proto", "http")),
        ("X-Forwarded-Host", kept_forwarded.get("x-forwarded-host", host)),
        ("X-Request-Id", forwarding.request_id),
        ("X-Auth-Status", forwarding.auth_status),
    ]
    if forwarding.authenticated_user is not None:
        added.append(("X-Authenticated-User", forwarding.authenticated_user))
    lines = [line for _, line in out]
    lines += [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in added]
    return lines


def response_headers(
    headers: list[tuple[bytes, bytes]], owned: list[tuple[str, str]]
) -> list[bytes]:
    """The upstream's header lines without hop-by-hop ones, with the gateway's `owned` headers
    in place of any the upstream sent under those names, and a `Date` if it sent none."""
    connection_named = {
        token.strip()
        for key, line in headers
        if key == b"connection"
        for token in line.partition(b":")[2].lower().replace(b"_", b"-").split(b",")
    }
    replaced = {name.lower().encode() for name, _ in owned}
    out: list[bytes] = []
    dated = False
    for key, line in headers:
        if key in _RESPONSE_DROPPED_BYTES or key in connection_named or key in replaced:
            continue
        dated = dated or key == b"date"
        out.append(line)
    out += header_lines(owned)
    if not dated:
        out.append(date_line())
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
            url.host,
            url.port or 80,
            settings.max_connections,
            settings.connect_timeout_seconds,
            settings.timeout_seconds,
        )
        self._client = Client(self._pool, host_header, self.BUFFER_BYTES)

    async def close(self) -> None:
        await self._pool.close()

    async def send(
        self, method: str, path: str, query: str | None, header_lines: list[bytes], body: bytes
    ) -> Answer:
        # Path and query were validated as plain RFC 3986 text: sent exactly as received.
        target = self._prefix + path if query is None else f"{self._prefix}{path}?{query}"
        try:
            answer = await self._client.request(method, target, header_lines, body)
        except TimeoutError:
            raise Rejected(Reason.UPSTREAM_TIMEOUT) from None
        except UPSTREAM_FAILURES:
            raise Rejected(Reason.UPSTREAM_BROKEN) from None
        return answer
