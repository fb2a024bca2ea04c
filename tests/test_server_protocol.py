"""The public listener's connection-level behaviour (gateway/http/server.py), over real
sockets on 127.0.0.1, against the real gateway and a real upstream.

What the rest of the suite pins down per request (statuses, the JSON errors, what reaches the
upstream) is taken as given here; these tests are about the connection: pipelining and its
order, who closes and when, HTTP/1.0, HEAD, upgrades, streamed answers and the graceful stop.
Every wait is a read bounded by a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from gateway.forwarding.upstream import BUFFER_BYTES
from gateway.http.connection import LINGER_SECONDS, MAX_QUEUED
from gateway.http.server import HttpServer
from tests.conftest import (
    GatewayFactory,
    Handler,
    RunningGateway,
    SlowUpstream,
    Upstream,
    eventually,
)

EVENTS = "/track/v2/projects/app/customers/events"
SDK_CONFIG = "/v2/sdkconfig"
UNKNOWN = "/nowhere"
ANONYMOUS = b'{"customer_ids": {"cookie": "c-1"}}'
IDENTIFIED = b'{"customer_ids": {"registered": "alice"}}'
JSON = ("Content-Type", "application/json")
SAMPLE_ANSWER = b'{"success": true}\n'  # what the recording upstream answers to everything


# --- raw HTTP ----------------------------------------------------------------------------------


def request(
    method: str = "POST",
    target: str = EVENTS,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    version: str = "1.1",
    content_length: bool = True,
) -> bytes:
    """One request as bytes; `Content-Length` is added for a body unless told otherwise."""
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if content_length and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post(request_id: str, body: bytes = ANONYMOUS, *extra: tuple[str, str]) -> bytes:
    return request("POST", EVENTS, [JSON, ("X-Request-Id", request_id), *extra], body)


def sdk_config(request_id: str, *extra: tuple[str, str], method: str = "GET") -> bytes:
    return request(method, SDK_CONFIG, [("X-App-Id", "app"), ("X-Request-Id", request_id), *extra])


@dataclass(frozen=True)
class Answer:
    status_line: str
    headers: list[tuple[str, str]]  # as received, in order
    body: bytes
    framing: str  # "length", "chunked", "close" or "none" (a HEAD answer's head only)

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, (name, found)
        return found[0] if found else None

    @property
    def closes(self) -> bool:
        return any(
            token.strip().lower() == "close"
            for value in self.values("connection")
            for token in value.split(",")
        )

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One client connection; every read is bounded by a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, *, head_only: bool = False, wait: float = 5) -> Answer:
        """The next answer on the connection, framed as its head says."""
        async with asyncio.timeout(wait):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head[:-4].split("\r\n")
            headers = [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines)]
            found = {n.lower(): v for n, v in headers}
            if head_only:
                return Answer(status_line, headers, b"", "none")
            if found.get("transfer-encoding", "").lower() == "chunked":
                assert "content-length" not in found, head
                return Answer(status_line, headers, await self._chunks(), "chunked")
            if "content-length" in found:
                body = await self.reader.readexactly(int(found["content-length"]))
                return Answer(status_line, headers, body, "length")
            return Answer(status_line, headers, await self.reader.read(), "close")

    async def _chunks(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                assert await self.reader.readuntil(b"\r\n") == b"\r\n"  # no trailers
                return bytes(body)
            body += await self.reader.readexactly(size)
            assert await self.reader.readexactly(2) == b"\r\n"

    async def rest(self, wait: float = 5) -> bytes:
        """Everything still sent until the server closes its side; fails at the deadline."""
        async with asyncio.timeout(wait):
            return await self.reader.read()

    async def reset_by_peer(self, wait: float = 5) -> bool:
        """Whether the server has closed its socket entirely (not only its sending side): the
        kernel then answers a byte sent to it with a reset, which a second write reports."""

        async def refused() -> bool:
            try:
                self.writer.write(b"\r\n")
                await self.writer.drain()
            except ConnectionError:
                return True
            return self.writer.transport.is_closing()

        try:
            await eventually(refused, "the server to reset the connection", wait)
        except AssertionError:
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Connection]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connection = Connection(reader, writer)
    try:
        yield connection
    finally:
        await connection.close()


def forwarded_ids(upstream: Upstream) -> list[str]:
    return [next(v for n, v in r.headers if n.lower() == "x-request-id") for r in upstream.received]


def listener(gateway: RunningGateway) -> HttpServer:
    public = gateway.server._public
    assert public is not None
    return public


# --- pipelining --------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_each_with_its_own_id(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    burst = post("pipe-a") + post("pipe-b", IDENTIFIED) + sdk_config("pipe-c")
    async with connect(gateway.port) as connection:
        await connection.send(burst)  # one write: the three arrive together
        answers = [await connection.answer() for _ in range(3)]
        assert [a.status for a in answers] == [200, 401, 200]
        assert [a.header("X-Request-Id") for a in answers] == ["pipe-a", "pipe-b", "pipe-c"]
        assert answers[0].body == answers[2].body == SAMPLE_ANSWER
        error = answers[1].json()["error"]
        assert (error["code"], error["request_id"]) == ("TOKEN_NOT_PROVIDED", "pipe-b")
        assert not any(a.closes for a in answers)
        # Still open for more after the burst.
        await connection.send(post("pipe-d"))
        assert (await connection.answer()).header("X-Request-Id") == "pipe-d"
    assert forwarded_ids(upstream) == ["pipe-a", "pipe-c", "pipe-d"]
    assert [r.path_qs for r in upstream.received] == [EVENTS, SDK_CONFIG, EVENTS]
    assert upstream.received[0].body == ANONYMOUS.decode()


async def test_pipelined_burst_past_the_queue_limit_is_answered_completely_in_order(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    # Padded so the burst spans many socket reads (the connection pauses reading past
    # MAX_QUEUED heads and must resume); every third request is refused without forwarding.
    count = MAX_QUEUED * 6
    pad = ("X-Pad", "p" * 4000)
    burst = b"".join(
        request("POST", UNKNOWN, [("X-Request-Id", f"burst-{i}"), pad])
        if i % 3 == 2
        else post(f"burst-{i}", ANONYMOUS, pad)
        for i in range(count)
    )
    assert len(burst) > 256 * 1024
    async with connect(gateway.port) as connection:
        sending = asyncio.ensure_future(connection.send(burst))
        answers = [await connection.answer() for _ in range(count)]
        await sending
        assert [a.header("X-Request-Id") for a in answers] == [f"burst-{i}" for i in range(count)]
        assert [a.status for a in answers] == [404 if i % 3 == 2 else 200 for i in range(count)]
        await connection.send(post("after-burst"))
        assert (await connection.answer()).status == 200
    expected = [f"burst-{i}" for i in range(count) if i % 3 != 2] + ["after-burst"]
    assert forwarded_ids(upstream) == expected


# --- who closes, and when ----------------------------------------------------------------------


async def test_connection_close_is_answered_with_close_then_nothing_after_it_is_answered(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    async with connect(gateway.port) as connection:
        await connection.send(post("last", ANONYMOUS, ("Connection", "close")) + post("never"))
        answer = await connection.answer()
        assert (answer.status, answer.header("X-Request-Id")) == (200, "last")
        assert answer.header("Connection") == "close"
        assert await connection.rest() == b""  # EOF, and no second answer before it
    assert forwarded_ids(upstream) == ["last"]


async def test_http10_without_keep_alive_closes_after_the_answer(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    data = request("POST", EVENTS, [JSON, ("X-Request-Id", "old")], ANONYMOUS, version="1.0")
    async with connect(gateway.port) as connection:
        await connection.send(data + post("never"))
        answer = await connection.answer()
        assert (answer.status, answer.body) == (200, SAMPLE_ANSWER)
        assert answer.header("Connection") == "close"
        assert await connection.rest() == b""
    assert forwarded_ids(upstream) == ["old"]


async def test_http10_keep_alive_is_kept_and_said_so(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    def old(request_id: str) -> bytes:
        headers = [JSON, ("X-Request-Id", request_id), ("Connection", "keep-alive")]
        return request("POST", EVENTS, headers, ANONYMOUS, version="1.0")

    async with connect(gateway.port) as connection:
        for request_id in ("old-1", "old-2"):
            await connection.send(old(request_id))
            answer = await connection.answer()
            assert (answer.status, answer.header("X-Request-Id")) == (200, request_id)
            assert answer.header("Connection") == "keep-alive"
            assert answer.framing == "length"
    assert forwarded_ids(upstream) == ["old-1", "old-2"]


async def test_client_half_close_still_gets_every_answer_then_eof(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    async with connect(gateway.port) as connection:
        await connection.send(post("half-1") + post("half-2"))
        connection.writer.write_eof()  # the client is done sending, not done reading
        answers = [await connection.answer() for _ in range(2)]
        assert [(a.status, a.header("X-Request-Id")) for a in answers] == [
            (200, "half-1"),
            (200, "half-2"),
        ]
        assert await connection.rest() == b""
    assert forwarded_ids(upstream) == ["half-1", "half-2"]


async def test_idle_kept_alive_connection_is_closed_after_the_idle_timeout(
    make_gateway: GatewayFactory,
) -> None:
    timeout = 0.5
    gateway = await make_gateway(limits={"idle_timeout_seconds": timeout})
    async with connect(gateway.port) as connection:
        await connection.send(post("idle"))
        answered = time.monotonic()
        assert (await connection.answer()).status == 200
        assert await connection.rest(wait=timeout + 3) == b""
        assert time.monotonic() - answered >= timeout - 0.05


# --- HEAD --------------------------------------------------------------------------------------


def head_allowed(config: dict[str, Any]) -> None:
    route = next(r for r in config["routes"] if r["name"] == "sdk-config")
    route["methods"] = ["GET", "HEAD"]


async def test_head_answer_is_headers_only(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(head_allowed)
    async with connect(gateway.port) as connection:
        # HEAD then GET in one write: the GET's status line must follow the HEAD's head at once.
        await connection.send(sdk_config("head", method="HEAD") + sdk_config("get"))
        head = await connection.answer(head_only=True)
        assert (head.status, head.header("X-Request-Id")) == (200, "head")
        got = await connection.answer()
        assert got.status_line == "HTTP/1.1 200 OK"
        assert (got.header("X-Request-Id"), got.body) == ("get", SAMPLE_ANSWER)
        assert not head.closes
    assert [r.method for r in upstream.received] == ["HEAD", "GET"]


async def test_head_answer_content_length_is_the_get_length_or_absent(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(head_allowed)
    async with connect(gateway.port) as connection:
        await connection.send(sdk_config("head", method="HEAD") + sdk_config("get"))
        head = await connection.answer(head_only=True)
        got = await connection.answer()
    assert head.header("Content-Length") in (None, str(len(got.body)))


# --- refused and unparsable requests -----------------------------------------------------------


async def test_unparsable_head_after_a_good_request_is_answered_in_its_turn_then_closed(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    broken = b"POST /track HTTP/1.1\r\nHost: 127.0.0.1\r\nNo colon here\r\n\r\n"
    async with connect(gateway.port) as connection:
        await connection.send(post("good") + broken + post("never"))
        good = await connection.answer()
        assert (good.status, good.header("X-Request-Id")) == (200, "good")
        assert not good.closes
        refused = await connection.answer()
        assert refused.status == 400
        assert refused.header("Content-Type") == "application/json"
        assert refused.header("Connection") == "close"
        error = refused.json()["error"]
        assert (error["code"], error["reason"]) == ("BAD_REQUEST", "http_malformed")
        assert error["request_id"] == refused.header("X-Request-Id") != "good"
        assert await connection.rest() == b""
    assert forwarded_ids(upstream) == ["good"]


async def test_upgrade_is_answered_as_plain_http_and_nothing_after_it_is_read(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    upgrade = sdk_config(
        "upgrade",
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    )
    async with connect(gateway.port) as connection:
        await connection.send(upgrade + sdk_config("after-upgrade"))
        answer = await connection.answer()
        assert answer.status_line == "HTTP/1.1 200 OK"  # never 101
        assert (answer.header("X-Request-Id"), answer.body) == ("upgrade", SAMPLE_ANSWER)
        assert answer.header("Upgrade") is None
        assert await connection.rest() == b""
    assert forwarded_ids(upstream) == ["upgrade"]
    assert "upgrade" not in upstream.last_headers()


async def test_upgrade_answer_says_the_connection_closes(gateway: RunningGateway) -> None:
    upgrade = sdk_config("upgrade", ("Connection", "Upgrade"), ("Upgrade", "websocket"))
    async with connect(gateway.port) as connection:
        await connection.send(upgrade)
        answer = await connection.answer()
        assert await connection.rest() == b""
    assert answer.closes


async def test_answer_before_the_body_arrived_closes_the_connection(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    # 404 needs no body: it is answered while 99 000 announced bytes are still missing. The
    # connection cannot be reused (its framing is mid-body), so it says so and is closed, even
    # though this client stays connected and silent.
    head = request(
        "POST",
        UNKNOWN,
        [("X-Request-Id", "early"), ("Content-Length", "100000")],
        content_length=False,
    )
    server = listener(gateway)
    async with connect(gateway.port) as connection:
        started = time.monotonic()
        await connection.send(head + b"x" * 1000)
        answer = await connection.answer(wait=2)
        assert time.monotonic() - started < 1
        assert (answer.status, answer.header("X-Request-Id")) == (404, "early")
        assert answer.header("Connection") == "close"
        assert await connection.rest(wait=2) == b""  # the server's FIN, at once

        async def closed() -> bool:
            return not server.connections

        await eventually(closed, "the server to close the connection", LINGER_SECONDS + 3)
        assert time.monotonic() - started < LINGER_SECONDS + 3
        assert await connection.reset_by_peer()  # gone, not only half-closed
    assert upstream.received == []


# --- answers past the upstream buffer ----------------------------------------------------------


PAYLOAD = os.urandom(3 * BUFFER_BYTES + 123)


async def big_gateway(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> RunningGateway:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=PAYLOAD, content_type="application/octet-stream")

    url = await serve_app(handler)
    return await make_gateway(upstream={"url": url, "timeout_seconds": 5})


async def test_answer_past_the_buffer_is_chunked_for_http11_and_the_connection_kept(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> None:
    gateway = await big_gateway(make_gateway, serve_app)
    async with connect(gateway.port) as connection:
        # Two pipelined, then one more once they are answered: all on the same connection.
        await connection.send(post("big-1") + post("big-2"))
        answers = [await connection.answer(wait=10) for _ in range(2)]
        await connection.send(post("big-3"))
        answers.append(await connection.answer(wait=10))
    for request_id, answer in zip(("big-1", "big-2", "big-3"), answers, strict=True):
        assert (answer.status, answer.header("X-Request-Id")) == (200, request_id)
        assert answer.framing == "chunked"
        assert answer.header("Content-Length") is None
        assert answer.header("Content-Type") == "application/octet-stream"
        assert not answer.closes
        assert len(answer.body) == len(PAYLOAD)
        assert hashlib.sha256(answer.body).digest() == hashlib.sha256(PAYLOAD).digest()


async def test_answer_past_the_buffer_is_close_delimited_for_http10(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> None:
    gateway = await big_gateway(make_gateway, serve_app)
    headers = [JSON, ("X-Request-Id", "big-old"), ("Connection", "keep-alive")]
    async with connect(gateway.port) as connection:
        await connection.send(request("POST", EVENTS, headers, ANONYMOUS, version="1.0"))
        answer = await connection.answer(wait=10)
    assert (answer.status, answer.header("X-Request-Id")) == (200, "big-old")
    assert answer.framing == "close"
    assert answer.header("Connection") == "close"
    assert answer.header("Transfer-Encoding") is None
    assert len(answer.body) == len(PAYLOAD)
    assert hashlib.sha256(answer.body).digest() == hashlib.sha256(PAYLOAD).digest()


async def test_answer_past_the_buffer_to_connection_close_says_close(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> None:
    gateway = await big_gateway(make_gateway, serve_app)
    async with connect(gateway.port) as connection:
        await connection.send(post("big-close", ANONYMOUS, ("Connection", "close")))
        answer = await connection.answer(wait=10)
        assert answer.body == PAYLOAD
        assert await connection.rest() == b""  # it does close
    assert answer.header("Connection") == "close"


PASSES_BETWEEN_BITES = 50


async def test_a_streamed_answer_stops_at_the_high_water_mark_for_a_slow_client(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> None:
    """The client reads nothing while the upstream fills the gateway's read buffer, then reads
    in small bites: each time the gateway may write again, the stream must stop at the
    transport's high-water mark (64 KiB), not pour what the upstream buffered into it."""
    piece, total, sent = b"x" * (64 * 1024), 16 << 20, [0]

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        response.content_length = total
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while sent[0] < total:
                await response.write(piece)
                sent[0] += len(piece)
        return response

    url = await serve_app(handler)
    gateway = await make_gateway(upstream={"url": url, "timeout_seconds": 30})
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
        await loop.sock_sendall(sock, post("slow-reader"))
        async with asyncio.timeout(5):
            assert (await loop.sock_recv(sock, 1024)).startswith(b"HTTP/1.1 200 ")
        (connection,) = listener(gateway).connections

        async def upstream_buffered() -> bool:
            return sent[0] >= 4 << 20  # held by the gateway, the sockets, or both

        await eventually(upstream_buffered, "the upstream to send 4 MiB the client has not read")
        largest, received = 0, 0
        async with asyncio.timeout(30):
            while received < 8 << 20:
                with contextlib.suppress(BlockingIOError):
                    received += len(sock.recv(64 * 1024, socket.MSG_DONTWAIT))
                # Between two bites, passes of the loop in which the upstream's bytes pile
                # up in the gateway while it waits for this client.
                for _ in range(PASSES_BETWEEN_BITES):
                    await asyncio.sleep(0)
                    transport = connection._transport
                    assert transport is not None
                    largest = max(largest, transport.get_write_buffer_size())
        assert largest < 256 * 1024, f"{largest} bytes queued for a client that reads slowly"
    finally:
        sock.close()


async def test_close_while_reading_is_paused_still_delivers_the_answers_in_flight(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> None:
    payload = os.urandom(256 * 1024)  # under the buffer: relayed whole, with a length

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=payload, content_type="application/octet-stream")

    url = await serve_app(handler)
    gateway = await make_gateway(
        upstream={"url": url, "timeout_seconds": 5}, limits={"max_body_bytes": 1024}
    )
    server = listener(gateway)
    # A slow reader: a small receive window, so most of the answer waits in the server's
    # send queue while the client is busy elsewhere.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    except BaseException:
        sock.close()
        raise
    connection = Connection(reader, writer)
    try:
        # 200 with the payload; then a 413, which closes the connection; then enough pipelined
        # requests to fill the queue, so the connection has stopped reading when it closes.
        burst = post("big") + post("too-big", b" " * 2000)
        burst += b"".join(post(f"queued-{i}") for i in range(MAX_QUEUED))
        await connection.send(burst)
        async with asyncio.timeout(5):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        assert head.startswith("HTTP/1.1 200 ")
        # The client, not yet aware of the close, goes on pipelining.
        await connection.send(b"".join(post(f"late-{i}") for i in range(MAX_QUEUED)))

        async def closed() -> bool:
            return not server.connections

        await eventually(closed, "the server to close the connection", LINGER_SECONDS + 3)
        # Only now does the client read on: both answers must be whole, then EOF.
        assert f"\r\nContent-Length: {len(payload)}\r\n" in head
        received = bytearray()
        reset: ConnectionError | None = None
        try:
            async with asyncio.timeout(5):
                while piece := await reader.read(65536):
                    received += piece
        except ConnectionError as exc:
            reset = exc
        assert reset is None, f"{reset!r} after {len(received)} of {len(payload)} body bytes"
        assert received[: len(payload)] == payload
        too_big = bytes(received[len(payload) :]).decode("latin-1")
        assert too_big.startswith("HTTP/1.1 413 ")
        assert "\r\nX-Request-Id: too-big\r\n" in too_big
        assert "\r\nConnection: close\r\n" in too_big
    finally:
        await connection.close()


# --- graceful stop -----------------------------------------------------------------------------


async def test_stop_finishes_the_request_in_flight_and_closes_idle_connections_at_once(
    make_gateway: GatewayFactory, slow_upstream: SlowUpstream
) -> None:
    gateway = await make_gateway(
        upstream={"url": slow_upstream.url, "timeout_seconds": 10},
        shutdown={"grace_seconds": 10},
    )
    port = gateway.port  # its socket is gone once stopped
    async with connect(port) as idle, connect(port) as busy:
        await idle.send(post("before-stop"))
        assert (await idle.answer()).status == 200  # now idle, kept alive
        await busy.send(post("in-flight", ANONYMOUS, ("X-Hold", "1")))
        async with asyncio.timeout(5):
            await slow_upstream.arrived.wait()

        stopping = asyncio.ensure_future(gateway.server.stop())
        started = time.monotonic()
        assert await idle.rest(wait=2) == b""  # closed without waiting for the busy one
        assert time.monotonic() - started < 1
        assert not stopping.done()  # still waiting for the request in flight

        slow_upstream.release.set()
        answer = await busy.answer()
        assert (answer.status, answer.header("X-Request-Id")) == (200, "in-flight")
        assert answer.body == SAMPLE_ANSWER
        assert answer.header("Connection") == "close"
        assert await busy.rest() == b""
        async with asyncio.timeout(5):
            await stopping
        assert time.monotonic() - started < 5
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
