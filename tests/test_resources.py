"""Memory and upstream connections stay bounded whatever the clients and the upstream do:
clients that never read, upstreams that declare huge chunks.

Every test runs the real gateway on loopback against a real upstream the test starts, and
measures what an attacker could grow: the process's resident memory (VmRSS), how long an
ordinary request waits, which connections stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import (
    GatewayFactory,
    Handler,
    RunningGateway,
    eventually,
    raw_request,
)

MIB = 1 << 20
EVENTS = "/track/v2/projects/app/customers/events"
ORDINARY = (
    f"POST {EVENTS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    "Content-Length: 2\r\n\r\n{}"
).encode()
BIG_GET = b"GET /v2/sdkconfig HTTP/1.1\r\nHost: 127.0.0.1\r\nX-App-Id: app\r\n\r\n"


def rss(pid: int | str = "self") -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def settled_rss() -> int:
    """This process's memory once what earlier tests freed is handed back to the system, so
    that what is allocated next shows as growth instead of reusing it unseen."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return rss()


async def peak_growth(baseline: int, done: Callable[[], bool], seconds: float) -> int:
    """The largest growth of this process's memory over `baseline`, watched until `done()`
    holds (what an unbounded gateway reaches quickly) or for `seconds` (a bounded one never
    gets there)."""
    deadline = time.monotonic() + seconds
    peak = 0
    while True:
        peak = max(peak, rss() - baseline)
        if done() or time.monotonic() >= deadline:
            return peak
        await asyncio.sleep(0.02)


async def stalled_client(port: int, data: bytes) -> socket.socket:
    """A client that sends `data` and then never reads: a tiny receive window, left full."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        async with asyncio.timeout(5):
            await loop.sock_sendall(sock, data)
    except BaseException:
        sock.close()
        raise
    return sock


async def timed(port: int, data: bytes = ORDINARY, wait: float = 10) -> tuple[int, float]:
    """An ordinary request on its own connection: its status and how long it took."""
    started = time.monotonic()
    answer = await raw_request(port, data, wait_seconds=wait)
    return answer.status, time.monotonic() - started


def open_connections(gateway: RunningGateway) -> int:
    public = gateway.server._public
    assert public is not None
    return len(public.connections)


# --- clients that never read -------------------------------------------------------------------

BIG_ANSWER = b"x" * (512 * 1024)  # under the upstream buffer: relayed whole, with a length


@pytest.fixture
async def big_answers(
    serve_app: Callable[[Handler], Awaitable[str]],
) -> tuple[str, list[int]]:
    """An upstream answering GETs with 512 KiB, anything else with a small JSON; counts GETs."""
    served = [0]

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if request.method == "GET":
            served[0] += 1
            return web.Response(body=BIG_ANSWER, content_type="application/octet-stream")
        return web.json_response({"success": True})

    return await serve_app(handler), served


async def test_pipelined_answers_for_a_client_that_never_reads_are_held_back(
    make_gateway: GatewayFactory, big_answers: tuple[str, list[int]]
) -> None:
    """512 pipelined GETs (32 KB sent) for 512 KiB answers each, never read: the gateway stops
    answering once the connection's output is past its high-water mark, instead of holding
    256 MiB for one client."""
    url, served = big_answers
    gateway = await make_gateway(upstream={"url": url, "timeout_seconds": 10})
    count = 512
    baseline = settled_rss()
    sock = await stalled_client(gateway.port, BIG_GET * count)
    try:
        growth = await peak_growth(baseline, lambda: served[0] >= count, seconds=3)
        status, took = await timed(gateway.port)
        growth = max(growth, rss() - baseline)
        assert growth < 30 * MIB, f"RSS +{growth / MIB:.0f} MiB for {served[0]} answers unread"
        assert served[0] < count
        assert status == 200
        assert took < 1, f"an ordinary request took {took:.2f} s"
    finally:
        sock.close()


async def test_a_client_that_never_reads_is_cut_after_the_idle_timeout(
    make_gateway: GatewayFactory, big_answers: tuple[str, list[int]]
) -> None:
    url, served = big_answers
    gateway = await make_gateway(
        upstream={"url": url, "timeout_seconds": 10}, limits={"idle_timeout_seconds": 1}
    )
    sock = await stalled_client(gateway.port, BIG_GET * 16)
    try:

        async def answering() -> bool:
            return served[0] > 0

        await eventually(answering, "the gateway to start answering", 5)
        started = time.monotonic()

        async def cut() -> bool:
            return open_connections(gateway) == 0

        await eventually(cut, "the stalled connection to be closed", 5)
        assert time.monotonic() - started < 4
        status, took = await timed(gateway.port)
        assert (status, took < 1) == (200, True)
    finally:
        sock.close()


# --- streamed answers that a client stops reading ----------------------------------------------


async def test_streams_a_client_stopped_reading_give_back_their_upstream_connections(
    make_gateway: GatewayFactory, serve_app: Callable[[Handler], Awaitable[str]]
) -> None:
    """Two clients take streamed answers and stop reading while the pool holds two upstream
    connections: an ordinary request must not wait for them, and the stalled streams are cut
    once the upstream's `timeout_seconds` has passed."""
    size = 16 * MIB

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.method != "GET":
            return web.json_response({"success": True})
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(size // (64 * 1024)):
                await response.write(b"y" * (64 * 1024))
        return response

    url = await serve_app(handler)
    gateway = await make_gateway(
        upstream={
            "url": url,
            "timeout_seconds": 2,
            "connect_timeout_seconds": 0.5,
            "max_connections": 2,
        }
    )
    stalled = [await stalled_client(gateway.port, BIG_GET) for _ in range(2)]
    try:
        loop = asyncio.get_running_loop()
        for sock in stalled:  # each has its answer's head, then stops reading
            async with asyncio.timeout(5):
                assert (await loop.sock_recv(sock, 1024)).startswith(b"HTTP/1.1 200 ")
        stalled_at = time.monotonic()

        status, took = await timed(gateway.port, wait=6)
        assert status in (200, 502)
        assert took < 1.5, f"an ordinary request waited {took:.2f} s for an upstream connection"

        async def cut() -> bool:
            return open_connections(gateway) == 0

        await eventually(cut, "the stalled streams to be cut", 6)
        assert time.monotonic() - stalled_at < 4
        status, took = await timed(gateway.port, wait=6)
        assert (status, took < 1) == (200, True)
    finally:
        for sock in stalled:
            sock.close()


# --- upstreams that declare more than they send at once ----------------------------------------


RawUpstream = Callable[[bytes, int], Awaitable[tuple[str, list[int]]]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    """An upstream written on raw sockets: after any request head it sends `head`, then
    filler bytes as fast as the gateway takes them, up to `total`; counts what it sent."""
    servers: list[asyncio.Server] = []

    async def start(head: bytes, total: int) -> tuple[str, list[int]]:
        sent = [0]

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            piece = b"z" * MIB
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                writer.write(head)
                while sent[0] < total:
                    writer.write(piece)
                    await writer.drain()
                    sent[0] += len(piece)
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", sent

    yield start
    for server in servers:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def test_a_huge_declared_chunk_is_read_in_bounded_pieces(
    make_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    """The upstream declares a 1 GiB chunk and pours 64 MiB of it at a client that does not
    read: the gateway stops reading the upstream past its buffer instead of holding it all."""
    total = 64 * MIB
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40000000\r\n"
    url, sent = await raw_upstream(head, total)
    gateway = await make_gateway(upstream={"url": url, "timeout_seconds": 10})
    baseline = settled_rss()
    sock = await stalled_client(gateway.port, BIG_GET)
    try:
        growth = await peak_growth(baseline, lambda: sent[0] >= total, seconds=3)
        assert growth < 24 * MIB, f"RSS +{growth / MIB:.0f} MiB, {sent[0] / MIB:.0f} MiB sent"
        assert sent[0] < total
    finally:
        sock.close()
