"""The headers of a forwarded request and of the answer relayed back.

Towards the upstream: hop-by-hop fields, the token and the gateway's own headers go; the
client's address headers stay only from a trusted proxy; the gateway's verdict is added. Back:
the upstream's end-to-end fields, with the gateway's own in place of any of the same name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus

from gateway.auth.extract import query_name_key
from gateway.http.messages import date_line, header_lines, normalise_header_name
from gateway.http.response_reader import Head

# Hop-by-hop (RFC 9110 §7.6.1) plus what the gateway sets or owns itself.
_REQUEST_DROPPED: Final = frozenset(
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
        "x-auth-status",
        "x-authenticated-user",
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
    """The raw query without the named parameters, in every spelling an upstream reads as
    theirs (`query_name_key`)."""
    if not raw_query or not names:
        return raw_query
    dropped = {query_name_key(n) for n in names}
    kept = [
        p
        for p in raw_query.split("&")
        if query_name_key(unquote_plus(p.partition("=")[0]).partition("[")[0]) not in dropped
    ]
    return "&".join(kept) if kept else None


@dataclass(slots=True)  # not frozen: its own __init__ assigns, and it is built once a request
class Forwarding:
    """What the gateway adds to, or removes from, a request it forwards."""

    request_id: str
    auth_status: str
    authenticated_user: str | None
    peer: str | None
    peer_trusted: bool
    scheme: bytes  # X-Forwarded-Proto unless a trusted proxy said: https on a TLS listener
    drop: frozenset[str]  # further normalised names: token headers, a decoded Content-Encoding
    token_scheme_drop: dict[str, tuple[bytes, ...]]  # name → values starting b"scheme " dropped

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(
        self,
        *,
        request_id: str,
        auth_status: str,
        authenticated_user: str | None,
        peer: str | None,
        peer_trusted: bool,
        scheme: bytes,
        drop: frozenset[str],
        token_scheme_drop: dict[str, tuple[bytes, ...]],
    ) -> None:
        self.request_id = request_id
        self.auth_status = auth_status
        self.authenticated_user = authenticated_user
        self.peer = peer
        self.peer_trusted = peer_trusted
        self.scheme = scheme
        self.drop = drop
        self.token_scheme_drop = token_scheme_drop


# Headers that name the client's address. Upstreams, their frameworks and their rate limiters
# believe them (Flask's ProxyFix, nginx's real_ip, Cloudflare-aware apps), so from a client that
# is not one of our trusted proxies they are dropped: otherwise anyone could pick the address an
# event is recorded from.
_CLIENT_ADDRESS: Final = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "x-client-ip",
        "cf-connecting-ip",
        "x-cluster-client-ip",
        "fastly-client-ip",
    }
)
_FORWARDING: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}) | (
    _CLIENT_ADDRESS
)
_NOT_RELAYED: Final = _REQUEST_DROPPED | _FORWARDING  # one set lookup decides for most headers


class _FromTrustedProxy:
    """The forwarding headers a trusted proxy sent: its X-Forwarded-For chain is extended, its
    X-Forwarded-Proto and -Host kept, its client-address headers relayed."""

    __slots__ = ("chain", "connection_named", "kept")

    def __init__(self, connection_named: frozenset[str] | set[str]) -> None:
        self.connection_named = connection_named
        self.chain: list[bytes] = []
        self.kept: dict[str, bytes] = {}

    def take(self, key: str, raw_name: bytes, raw_value: bytes, lines: list[bytes]) -> None:
        if key == "x-forwarded-for":
            self.chain.append(raw_value)
        elif key in _CLIENT_ADDRESS:
            if key not in self.connection_named:
                lines.append(raw_name + b": " + raw_value)
        else:
            self.kept.setdefault(key, raw_value)


def forward_headers(
    keys: list[str], raw_headers: list[tuple[bytes, bytes]], forwarding: Forwarding
) -> list[bytes]:
    """The request's headers as the upstream gets them ("Name: value" lines, the client's
    bytes unchanged), in one pass over what was received; `keys` are their `header_key`s."""
    connection_named: frozenset[str] | set[str] = frozenset()
    if "connection" in keys:  # headers the client marked hop-by-hop, wherever they came
        connection_named = _connection_named(
            value.decode("latin-1")
            for key, (_, value) in zip(keys, raw_headers, strict=True)
            if key == "connection"
        )
    drop, scheme_drop = forwarding.drop, forwarding.token_scheme_drop
    # From a peer that is not a trusted proxy, forwarding headers are dropped.
    proxy = _FromTrustedProxy(connection_named) if forwarding.peer_trusted else None
    lines: list[bytes] = []
    host: bytes | None = None
    # By index rather than zip(..., strict=True), which the compiled build calls generically,
    # keyword and all.
    for index, key in enumerate(keys):
        raw_name, raw_value = raw_headers[index]
        if key in _NOT_RELAYED:
            if key == "host":
                host = raw_value if host is None else host
            elif proxy is not None and key in _FORWARDING:
                proxy.take(key, raw_name, raw_value, lines)
            continue
        if key in drop or key in connection_named:
            continue
        if key in scheme_drop and _has_scheme(raw_value, scheme_drop[key]):
            continue
        lines.append(raw_name + b": " + raw_value)
    lines += _added_lines(forwarding, proxy, host)
    return lines


def _has_scheme(value: bytes, schemes: tuple[bytes, ...]) -> bool:
    """Whether `value` starts with one of `schemes` (lower case, longest last) in any case.
    Only as much of it as the longest scheme is lowered, not the token of hundreds of bytes
    that follows."""
    return value.strip()[: len(schemes[-1])].lower().startswith(schemes)


def _added_lines(
    forwarding: Forwarding, proxy: _FromTrustedProxy | None, host: bytes | None
) -> list[bytes]:
    """What the gateway says of the request: where it came from, and its verdict."""
    chain = proxy.chain if proxy is not None else []
    kept = proxy.kept if proxy is not None else {}
    chain.append((forwarding.peer or "unknown").encode())
    lines = [
        b"X-Forwarded-For: " + b", ".join(chain),
        b"X-Forwarded-Proto: " + kept.get("x-forwarded-proto", forwarding.scheme),
        b"X-Forwarded-Host: " + kept.get("x-forwarded-host", host or b""),
        b"X-Request-Id: " + forwarding.request_id.encode(),
        b"X-Auth-Status: " + forwarding.auth_status.encode(),
    ]
    if forwarding.authenticated_user is not None:
        lines.append(b"X-Authenticated-User: " + forwarding.authenticated_user.encode())
    return lines


def response_headers(head: Head, owned: list[tuple[str, str]]) -> list[bytes]:
    """The upstream's end-to-end header lines, with the gateway's `owned` headers in place of
    any the upstream sent under those names (but `Vary`, whose values are joined: a cache must
    still tell apart what the upstream varies on), and a `Date` if it sent none."""
    replaced = [name.lower().encode() for name, _ in owned]
    if any(name in head.names for name in replaced):
        if b"vary" in replaced and b"vary" in head.names:
            owned = _joined_vary(head, owned)
        out = [line for line in head.lines if line.partition(b":")[0].lower() not in replaced]
    else:
        out = list(head.lines)
    out += header_lines(owned)
    if b"date" not in head.names:
        out.append(date_line())
    return out


def _joined_vary(head: Head, owned: list[tuple[str, str]]) -> list[tuple[str, str]]:
    theirs = [
        line.partition(b":")[2].strip().decode("latin-1")
        for line in head.lines
        if line.partition(b":")[0].lower() == b"vary"
    ]
    return [
        (name, ", ".join([*theirs, value]) if name.lower() == "vary" else value)
        for name, value in owned
    ]
