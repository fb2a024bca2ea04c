"""Forwarding: `outgoing` is the request as the upstream gets it (the token and the gateway's
own headers gone, the verdict added); `exchange_with` is the exchange with a real upstream on
loopback, timed, with its failures as 502/504 reasons; `relayed` is the upstream's answer with
the gateway's own headers: the request id, CORS, and a warning when the token expires soon."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.auth.target import Target
from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig
from gateway.config.settings import UpstreamSettings
from gateway.forwarding.upstream import Upstream
from gateway.http.client import Answer
from gateway.http.messages import Request
from gateway.http.outbox import Outbox
from gateway.http.response_reader import ResponseReader
from gateway.refusals.reasons import Reason, Rejected
from gateway.stages.authenticate import AuthStatus, Checked, check
from gateway.stages.exchange import Exchange
from gateway.stages.forward import Outgoing, exchange_with, outgoing, relayed
from gateway.telemetry.metrics import Metrics, Timings
from tests.conftest import NOW, KeyPair, Tokens
from tests.stages.support import (
    CONFIG,
    EVENTS,
    ORIGIN,
    PEER,
    check_inputs,
    compile_yaml,
    json_post,
    make_request,
    sample,
)

ALICE = b'{"customer_ids": {"registered": "alice"}}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@dataclass
class Prepared:
    """A request past the checks, as `outgoing` and `relayed` receive it."""

    request: Request
    target: Target
    exchange: Exchange
    checked: Checked


async def prepared(config: CompiledConfig, request: Request) -> Prepared:
    route, project, parts, target, body, reading, limits, mode = await check_inputs(config, request)
    exchange = Exchange("req-1", route=route, project=project, mode=mode)
    checked = check(route, project, parts, target, body, reading, limits, mode)
    return Prepared(request, target, exchange, checked)


def sent(config: CompiledConfig, ready: Prepared, status: str | None = None) -> Outgoing:
    return outgoing(
        ready.request,
        ready.target,
        ready.exchange,
        ready.checked,
        status or ready.checked.status,
        config,
    )


def answer(raw: bytes, rest: AsyncGenerator[bytes, None] | None = None) -> Answer:
    """The upstream's answer as the client reads it: its head parsed by the real reader."""
    reader = ResponseReader()
    reader.begin("POST")
    reader.feed(raw)
    assert reader.head is not None
    return Answer(reader.head, raw.partition(b"\r\n\r\n")[2], rest)


def named(lines: list[bytes], name: bytes) -> list[bytes]:
    """The values of the header lines called `name`, in order."""
    prefix = name.lower() + b":"
    return [line.partition(b":")[2].strip() for line in lines if line.lower().startswith(prefix)]


# --- outgoing ----------------------------------------------------------------------------------


async def test_the_token_and_spoofed_verdicts_are_not_forwarded(
    config: CompiledConfig, tokens: Tokens
) -> None:
    token = tokens.good("alice")
    request = json_post(
        EVENTS,
        ALICE,
        [
            ("X-Sdk-Auth-Token", token),
            ("Authorization", f"Bearer {token}"),
            ("X-Auth-Status", "verified"),
            ("X-Authenticated-User", "mallory"),
            ("X-Request-Id", "spoofed"),
            ("X-Custom", "kept"),
        ],
    )
    out = sent(config, await prepared(config, request))
    lines = out.header_lines
    assert named(lines, b"X-Sdk-Auth-Token") == []
    assert named(lines, b"Authorization") == []
    assert named(lines, b"X-Auth-Status") == [b"verified"]
    assert named(lines, b"X-Authenticated-User") == [b"alice"]
    assert named(lines, b"X-Request-Id") == [b"req-1"]
    assert named(lines, b"X-Forwarded-Proto") == [b"http"]  # the listener serves plain HTTP
    assert named(lines, b"X-Custom") == [b"kept"]
    assert named(lines, b"Content-Type") == [b"application/json"]
    assert named(lines, b"Content-Length") == []  # the client writes the length it sends
    assert (out.method, out.path, out.query, out.body) == ("POST", EVENTS, None, ALICE)


async def test_an_authorization_of_another_scheme_is_forwarded(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(
        EVENTS,
        ALICE,
        [("X-Sdk-Auth-Token", tokens.good("alice")), ("Authorization", "Basic dXNlcjpwdw==")],
    )
    out = sent(config, await prepared(config, request))
    assert named(out.header_lines, b"Authorization") == [b"Basic dXNlcjpwdw=="]


async def test_an_authorization_of_either_token_scheme_is_not_forwarded(
    tmp_path: Path, clock: ManualClock, key_a: KeyPair, tokens: Tokens
) -> None:
    # Two schemes of different lengths on one header: each is matched in any case and after
    # leading whitespace, the shorter one included, and only a whole scheme and its space.
    bearer = "  - header: Authorization\n    scheme: Bearer\n"
    text = CONFIG.replace(bearer, bearer + "  - header: Authorization\n    scheme: JWT\n")
    assert text != CONFIG
    config = compile_yaml(tmp_path, text, clock, {"a.pem": key_a})
    token = tokens.good("alice")
    for value in (f"bearer {token}", f"JWT {token}", f"  jwt  {token}"):
        request = json_post(EVENTS, ALICE, [("Authorization", value)])
        out = sent(config, await prepared(config, request))
        assert named(out.header_lines, b"X-Auth-Status") == [b"verified"], value
        assert named(out.header_lines, b"Authorization") == [], value
    for value in ("JWTs dXNlcjpwdw==", "Basic dXNlcjpwdw=="):
        request = json_post(EVENTS, ALICE, [("X-Sdk-Auth-Token", token), ("Authorization", value)])
        out = sent(config, await prepared(config, request))
        assert named(out.header_lines, b"Authorization") == [value.encode()]


async def test_the_client_address_is_the_peer_unless_a_trusted_proxy_says_more(
    config: CompiledConfig,
) -> None:
    direct = json_post(EVENTS, b"{}", [("X-Forwarded-For", "192.0.2.1")])
    out = sent(config, await prepared(config, direct))
    assert named(out.header_lines, b"X-Forwarded-For") == [PEER.encode()]
    assert named(out.header_lines, b"X-Forwarded-Host") == [b"gateway.test"]
    proxied = json_post(EVENTS, b"{}", [("X-Forwarded-For", "192.0.2.1")], remote="10.1.2.3")
    out = sent(config, await prepared(config, proxied))
    assert named(out.header_lines, b"X-Forwarded-For") == [b"192.0.2.1, 10.1.2.3"]


async def test_a_decoded_body_goes_on_decoded_without_its_content_encoding(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(
        EVENTS,
        gzip.compress(ALICE),
        [("Content-Encoding", "gzip"), ("X-Sdk-Auth-Token", tokens.good("alice"))],
    )
    out = sent(config, await prepared(config, request))
    assert out.body == ALICE
    assert named(out.header_lines, b"Content-Encoding") == []


async def test_a_query_token_is_stripped_and_the_rest_of_the_query_kept(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = make_request(
        "GET", f"/track/v2/projects/app/pixel?uid=alice&token={tokens.good()}&ev=open"
    )
    out = sent(config, await prepared(config, request))
    assert out.query == "uid=alice&ev=open"
    assert out.path == "/track/v2/projects/app/pixel"


async def test_a_forwarded_failure_names_no_user(config: CompiledConfig, tokens: Tokens) -> None:
    """`monitor` forwards a failed request marked unverified, and vouches for nobody."""
    request = json_post(
        "/track/v2/projects/watch/customers/events",
        ALICE,
        [("X-Sdk-Auth-Token", tokens.good("mallory"))],
    )
    ready = await prepared(config, request)
    assert ready.checked.failure is Reason.SUBJECT_MISMATCH
    out = sent(config, ready, AuthStatus.UNVERIFIED)
    assert named(out.header_lines, b"X-Auth-Status") == [b"unverified"]
    assert named(out.header_lines, b"X-Authenticated-User") == []


# --- exchange_with -----------------------------------------------------------------------------


class LoopbackUpstream:
    """A small HTTP/1.1 server on 127.0.0.1 that reads each request whole, records it, and
    then `answers` (200 with `{}`), `hangs_up` (closes without a word) or stays `silent` (holds
    the connection, answering nothing, until it is closed)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.received: list[bytes] = []
        self._release = asyncio.Event()
        self._active = 0
        self._all_done = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._active += 1
        self._all_done.clear()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.received.append(head + await reader.readexactly(length))
            if self.behaviour == "answers":
                writer.write(OK)
                await writer.drain()
            elif self.behaviour == "silent":
                await self._release.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway gave up on the exchange and closed the connection
        finally:
            writer.close()
            self._active -= 1
            if not self._active:
                self._all_done.set()

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._active:
            async with asyncio.timeout(5):
                await self._all_done.wait()


Connect = Callable[[str, float], Awaitable[tuple[LoopbackUpstream, Upstream]]]


def client_to(url: str, timeout: float) -> Upstream:
    """The gateway's pooled client to the upstream at `url` (plain HTTP), with an exchange
    timeout."""
    settings = UpstreamSettings(url=url, timeout_seconds=timeout)
    return Upstream("default", settings, None, Outbox(asyncio.get_running_loop()))


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """An upstream server with a behaviour, and the gateway's client to it; both are closed
    after the test."""
    servers: list[LoopbackUpstream] = []
    clients: list[Upstream] = []

    async def start(behaviour: str, seconds: float) -> tuple[LoopbackUpstream, Upstream]:
        server = LoopbackUpstream(behaviour)
        servers.append(server)
        url = await server.start()
        client = client_to(url, seconds)
        clients.append(client)
        return server, client

    yield start
    for client in clients:
        await client.close()
    for server in servers:
        await server.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def timings(metrics: Metrics) -> Timings:
    return metrics.timings(metrics.upstream_duration.labels("track-events"))


def upstream_timed(metrics: Metrics) -> float:
    return sample(metrics, "gateway_upstream_duration_seconds_count", {"route": "track-events"})


EVENT = Outgoing(
    "POST", EVENTS, "v=1", [b"Content-Type: application/json", b"X-Request-Id: req-1"], b"{}"
)


async def test_the_upstreams_answer_is_returned_and_timed(
    connect: Connect, metrics: Metrics, timings: Timings
) -> None:
    server, client = await connect("answers", 5)
    got = await exchange_with(client, EVENT, timings)
    assert (got.status, got.body, got.rest) == (200, b"{}", None)
    assert named(list(got.head.lines), b"Content-Type") == [b"application/json"]
    assert upstream_timed(metrics) == 1
    [received] = server.received
    assert received.startswith(f"POST {EVENTS}?v=1 HTTP/1.1\r\n".encode())
    assert b"\r\nX-Request-Id: req-1\r\n" in received
    assert received.endswith(b"\r\n\r\n{}")


async def test_an_upstream_that_hangs_up_is_upstream_broken(
    connect: Connect, metrics: Metrics, timings: Timings
) -> None:
    _, client = await connect("hangs_up", 5)
    with pytest.raises(Rejected) as refused:
        await exchange_with(client, EVENT, timings)
    assert refused.value.reason is Reason.UPSTREAM_BROKEN
    assert upstream_timed(metrics) == 1


async def test_an_upstream_that_does_not_answer_in_time_is_upstream_timeout(
    connect: Connect, metrics: Metrics, timings: Timings
) -> None:
    _, client = await connect("silent", 0.1)
    with pytest.raises(Rejected) as refused:
        await exchange_with(client, EVENT, timings)
    assert refused.value.reason is Reason.UPSTREAM_TIMEOUT
    assert upstream_timed(metrics) == 1


async def test_an_upstream_nobody_listens_on_is_upstream_connect(timings: Timings) -> None:
    with socket.socket() as holder:  # a port just free: nothing listens on it
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
    client = client_to(f"http://127.0.0.1:{port}", 5)
    try:
        with pytest.raises(Rejected) as refused:
            await exchange_with(client, EVENT, timings)
    finally:
        await client.close()
    assert refused.value.reason is Reason.UPSTREAM_CONNECT


# --- relayed -----------------------------------------------------------------------------------


async def verified_with(config: CompiledConfig, tokens: Tokens, ttl: float) -> Prepared:
    token = tokens.mint(tokens.claims("alice", ttl=ttl))
    return await prepared(config, json_post(EVENTS, ALICE, [("X-Sdk-Auth-Token", token)]))


async def test_the_upstreams_request_id_is_replaced_by_ours(config: CompiledConfig) -> None:
    ready = await prepared(config, json_post(EVENTS, b"{}"))
    raw = b"HTTP/1.1 201 Created\r\nX-Request-Id: theirs\r\nContent-Length: 2\r\n\r\n{}"
    response = relayed(answer(raw), ready.exchange, ready.checked, NOW, 5)
    assert response.status == 201
    assert response.body == b"{}"
    assert named(response.headers, b"X-Request-Id") == [b"req-1"]
    assert named(response.headers, b"Content-Length") == []  # the connection frames the answer
    assert len(named(response.headers, b"Date")) == 1
    assert ready.exchange.upstream_status == 201
    assert response.stream is None


async def test_the_upstreams_date_is_kept(config: CompiledConfig) -> None:
    ready = await prepared(config, json_post(EVENTS, b"{}"))
    raw = b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\nContent-Length: 0\r\n\r\n"
    response = relayed(answer(raw), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"Date") == [b"Tue, 01 Jan 2030 00:00:00 GMT"]


async def test_a_listed_origin_gets_our_cors_headers_in_place_of_the_upstreams(
    config: CompiledConfig,
) -> None:
    ready = await prepared(config, json_post(EVENTS, b"{}", [("Origin", ORIGIN)]))
    ready.exchange.cors_headers = {"Access-Control-Allow-Origin": ORIGIN, "Vary": "Origin"}
    raw = b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 0\r\n\r\n"
    response = relayed(answer(raw), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"Access-Control-Allow-Origin") == [ORIGIN.encode()]
    assert named(response.headers, b"Vary") == [b"Origin"]


async def test_the_upstreams_vary_is_joined_with_ours_not_replaced(config: CompiledConfig) -> None:
    """A cache must still tell apart what the upstream varies on (its encodings, say)."""
    ready = await prepared(config, json_post(EVENTS, b"{}", [("Origin", ORIGIN)]))
    ready.exchange.cors_headers = {"Access-Control-Allow-Origin": ORIGIN, "Vary": "Origin"}
    raw = b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nContent-Length: 0\r\n\r\n"
    response = relayed(answer(raw), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"Vary") == [b"Accept-Encoding, Origin"]


async def test_a_token_expiring_within_the_warning_window_is_announced(
    config: CompiledConfig, tokens: Tokens
) -> None:
    """`expiry_warning_seconds` is 300 by default; the seconds left are rounded down."""
    ready = await verified_with(config, tokens, ttl=120)
    response = relayed(answer(OK), ready.exchange, ready.checked, NOW + 0.5, 5)
    assert named(response.headers, b"X-Auth-Warning") == [b"TOKEN_ABOUT_TO_EXPIRE"]
    assert named(response.headers, b"X-Auth-Token-Expires-In") == [b"119"]


async def test_a_token_expiring_exactly_at_the_window_is_announced(
    config: CompiledConfig, tokens: Tokens
) -> None:
    ready = await verified_with(config, tokens, ttl=300)
    response = relayed(answer(OK), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"X-Auth-Token-Expires-In") == [b"300"]


async def test_a_token_past_exp_but_within_leeway_shows_zero_seconds_left(
    config: CompiledConfig, tokens: Tokens
) -> None:
    ready = await verified_with(config, tokens, ttl=-10)
    assert ready.checked.status == AuthStatus.VERIFIED  # the default leeway is 30 s
    response = relayed(answer(OK), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"X-Auth-Token-Expires-In") == [b"0"]


async def test_a_token_far_from_expiry_gets_no_warning(
    config: CompiledConfig, tokens: Tokens
) -> None:
    ready = await verified_with(config, tokens, ttl=3600)
    response = relayed(answer(OK), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"X-Auth-Warning") == []
    assert named(response.headers, b"X-Auth-Token-Expires-In") == []


async def test_a_request_without_a_verified_token_gets_no_warning(
    config: CompiledConfig,
) -> None:
    ready = await prepared(config, json_post(EVENTS, b"{}"))
    response = relayed(answer(OK), ready.exchange, ready.checked, NOW, 5)
    assert named(response.headers, b"X-Auth-Warning") == []


async def test_an_answer_past_the_buffer_is_streamed_within_the_timeout(
    config: CompiledConfig,
) -> None:
    async def rest() -> AsyncGenerator[bytes, None]:
        yield b"more"

    pieces = rest()
    ready = await prepared(config, json_post(EVENTS, b"{}"))
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    response = relayed(answer(raw, pieces), ready.exchange, ready.checked, NOW, 7.5)
    try:
        assert response.stream is not None
        assert response.stream.pieces is pieces
        assert response.stream.within_seconds == 7.5
    finally:
        await pieces.aclose()
