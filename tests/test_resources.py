"""Memory, upstream connections and client connections stay bounded whatever the clients and
the upstream do: clients that never read, upstreams that declare huge chunks, more clients than
the gateway will hold, and a process out of file descriptors.

Every test runs the real gateway on loopback against a real upstream the test starts, and
measures what an attacker could grow: the process's resident memory (VmRSS), how long an
ordinary request waits, which connections stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import re
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config.settings import ConfigError, LimitsSettings, load_settings
from tests.conftest import (
    GatewayFactory,
    Handler,
    KeyPair,
    RunningGateway,
    base_config,
    eventually,
    free_port,
    gateway_process,
    log_records,
    raw_request,
    write_config,
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


async def metric(gateway_admin: str, name: str) -> float:
    """One sample of the admin /metrics (0 when it is not there)."""
    async with aiohttp.ClientSession() as http, http.get(gateway_admin + "/metrics") as answer:
        text = await answer.text()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


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


@pytest.mark.parametrize("upstream_of_routes", ["default", "named"])
async def test_streams_a_client_stopped_reading_give_back_their_upstream_connections(
    make_gateway: GatewayFactory,
    serve_app: Callable[[Handler], Awaitable[str]],
    upstream_of_routes: str,
) -> None:
    """Two clients take streamed answers and stop reading while the pool holds two upstream
    connections: an ordinary request must not wait for them, and the stalled streams are cut
    once the upstream's `timeout_seconds` has passed (the routes' own upstream's, when they
    name one: the default's 30 s would not cut them in time)."""
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
    pool = {"url": url, "timeout_seconds": 2, "connect_timeout_seconds": 0.5, "max_connections": 2}
    if upstream_of_routes == "default":
        gateway = await make_gateway(upstream=pool)
    else:

        def name_it(config: dict[str, Any]) -> None:
            for route in config["routes"]:
                route["upstream"] = "stream"

        gateway = await make_gateway(
            name_it, upstream={"url": url, "timeout_seconds": 30}, upstreams={"stream": pool}
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


# --- more client connections than allowed ------------------------------------------------------


def test_the_connection_limit_is_at_least_one(tmp_path: Path, key_a: KeyPair) -> None:
    config = base_config("http://127.0.0.1:8000")
    loaded = load_settings(write_config(tmp_path, config, {"a.pem": key_a}), env={})
    assert loaded.settings.limits == LimitsSettings(max_client_connections=10_000)
    config["limits"] = {"max_client_connections": 0}
    with pytest.raises(ConfigError) as refused:
        load_settings(write_config(tmp_path, config, {"a.pem": key_a}), env={})
    (problem,) = [str(p) for p in refused.value.problems]
    assert problem.startswith("limits.max_client_connections: ")
    assert problem.endswith("(got 0)")


async def test_connections_past_the_limit_are_closed_at_once_and_counted(
    make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await make_gateway(limits={"max_client_connections": 5})
    held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(5)]
    try:

        async def all_open() -> bool:
            return open_connections(gateway) == 5

        await eventually(all_open, "five open connections", 5)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            async with asyncio.timeout(2):
                assert await reader.read(1) == b""  # closed before anything was sent
        finally:
            writer.close()
        refused = 'gateway_connections_refused_total{reason="limit"}'
        assert await metric(gateway.admin_url, refused) == 1
        assert await metric(gateway.admin_url, "gateway_client_connections") == 5
        logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [(r.name, r.getMessage()) for r in logged] == [
            ("gateway.server", "client connection refused")
        ]

        held.pop()[1].close()

        async def served() -> bool:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                return (await raw_request(gateway.port, ORDINARY, wait_seconds=2)).status == 200
            return False

        await eventually(served, "a connection under the limit to be served", 5)
    finally:
        for _, idle in held:
            idle.close()


async def test_accept_errors_are_counted_and_logged_and_serving_goes_on(
    tmp_path: Path,
    key_a: KeyPair,
    key_b: KeyPair,
    serve_app: Callable[[Handler], Awaitable[str]],
) -> None:
    """`gateway run` with 64 file descriptors and 100 clients: accepting fails with EMFILE,
    which is counted and logged; once clients leave, the waiting ones are served."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"success": True})

    config = base_config(await serve_app(handler))
    port, admin = free_port(), free_port()
    config.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}")
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    stderr = tmp_path / "stderr.log"

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    held: list[asyncio.StreamWriter] = []
    async with gateway_process(
        path, f"127.0.0.1:{admin}", what="readiness", stderr=stderr, preexec_fn=few_descriptors
    ):
        try:
            held += [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in range(100)]

            async def logged() -> bool:
                return b"accepting a connection failed" in stderr.read_bytes()

            await eventually(logged, "the accept error in the log", 10)
            for writer in held:
                writer.close()
            held.clear()

            async def served() -> bool:
                with contextlib.suppress(
                    ConnectionError, asyncio.IncompleteReadError, TimeoutError
                ):
                    return (await raw_request(port, ORDINARY, wait_seconds=2)).status == 200
                return False

            await eventually(served, "serving once descriptors are free", 10)
            name = 'gateway_connections_refused_total{reason="accept_error"}'
            assert await metric(f"http://127.0.0.1:{admin}", name) >= 1
            times = [
                datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
                for record in log_records(stderr.read_text(), strict=False)
                if record["message"] == "accepting a connection failed"
            ]
            assert times
            assert all(
                later - earlier > timedelta(seconds=0.9) for earlier, later in pairwise(times)
            )
        finally:
            for writer in held:
                writer.close()
