"""Forwarding and relaying, against real upstreams on port 0 started by each test.

Well-behaved upstreams are aiohttp apps; misbehaving ones (silent, or closing mid-answer) are
raw asyncio servers, so the misbehaviour is exactly what is written here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from tests.conftest import GatewayFactory, Handler, RunningGateway, Tokens, Upstream, free_port

EVENTS = "/track/v2/projects/app/customers/events"
ANONYMOUS = b'{"customer_ids": {"cookie": "c-123"}, "event_type": "view"}'
JSON = {"Content-Type": "application/json"}

RawBehaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- upstreams the tests start -------------------------------------------------------------------


class RawUpstream:
    """A TCP server that reads one request head per connection, then does `behaviour`."""

    def __init__(self, behaviour: RawBehaviour) -> None:
        self.behaviour = behaviour
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()
        # Every handler ends once its connection is closed; wait for them, bounded.
        if self.handlers:
            _, pending = await asyncio.wait(self.handlers, timeout=5)
            assert not pending, "an upstream handler did not finish"


@pytest.fixture
async def serve_raw() -> AsyncIterator[Callable[[RawBehaviour], Awaitable[RawUpstream]]]:
    started: list[RawUpstream] = []

    async def start(behaviour: RawBehaviour) -> RawUpstream:
        upstream = RawUpstream(behaviour)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


async def gateway_before(make_gateway: GatewayFactory, url: str, **upstream: Any) -> RunningGateway:
    return await make_gateway(upstream={"url": url, "timeout_seconds": 5, **upstream})


async def post(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    body: bytes = ANONYMOUS,
    headers: dict[str, str] | None = None,
    path: str = EVENTS,
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    url = URL(gateway.url + path, encoded=True)
    async with http.post(url, data=body, headers={**JSON, **(headers or {})}) as response:
        return response.status, response.headers, await response.read()


def assert_gateway_error(
    status: int,
    headers: CIMultiDictProxy[str],
    body: bytes,
    expected_status: int,
    code: str,
    reason: str,
) -> None:
    assert status == expected_status, body
    assert headers["Content-Type"] == "application/json"
    parsed = json.loads(body)
    assert parsed["token_expired"] is False
    assert parsed["error"]["code"] == code
    assert parsed["error"]["reason"] == reason
    assert parsed["error"]["request_id"] == headers["X-Request-Id"]


# --- the upstream's answer, relayed unchanged ----------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        pytest.param(201, b'{"id": 7}', "application/json", id="created"),
        pytest.param(
            400,
            b'{"error": "bad event", "field": "event_type"}',
            "application/json",
            id="client_error_json",
        ),
        pytest.param(422, b"unprocessable", "text/plain", id="unprocessable_text"),
        pytest.param(500, b"upstream exploded", "text/plain", id="server_error"),
        pytest.param(503, b"", "text/plain", id="unavailable_empty"),
    ],
)
async def test_upstream_status_headers_and_body_are_relayed_unchanged(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_app: Callable[[Handler], Awaitable[str]],
    status: int,
    body: bytes,
    content_type: str,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(status=status, body=body, content_type=content_type)
        response.headers["X-Custom"] = "custom value"
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/")
        return response

    gateway = await gateway_before(make_gateway, await serve_app(handler))
    async with http.post(gateway.url + EVENTS, data=ANONYMOUS, headers=JSON) as response:
        assert response.status == status  # a 5xx stays a 5xx: the SDK keeps its batch
        assert await response.read() == body
        assert response.headers["Content-Type"].startswith(content_type)
        assert response.headers["X-Custom"] == "custom value"
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert response.headers["X-Request-Id"]


async def test_gzip_upstream_answer_is_relayed_byte_for_byte(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_app: Callable[[Handler], Awaitable[str]],
) -> None:
    compressed = gzip.compress(json.dumps({"events": list(range(500))}).encode(), mtime=0)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=compressed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    gateway = await gateway_before(make_gateway, await serve_app(handler))
    assert http.auto_decompress is False
    status, headers, body = await post(http, gateway)
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert body == compressed


async def test_large_upstream_answer_is_streamed_through_intact(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_app: Callable[[Handler], Awaitable[str]],
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 123)  # well past the 1 MiB buffer

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=payload, content_type="application/octet-stream")

    gateway = await gateway_before(make_gateway, await serve_app(handler))
    status, _, body = await post(http, gateway)
    assert status == 200
    assert len(body) == len(payload)
    assert hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()


# --- an upstream that cannot answer: 502/504, never 2xx ------------------------------------------


async def test_upstream_not_listening_is_502_with_retry_after(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory
) -> None:
    gateway = await gateway_before(make_gateway, f"http://127.0.0.1:{free_port()}")
    status, headers, body = await post(http, gateway)
    assert_gateway_error(
        status, headers, body, 502, "UPSTREAM_UNAVAILABLE", "upstream_connect_failed"
    )
    assert headers["Retry-After"].isdigit()
    assert int(headers["Retry-After"]) >= 1


async def test_upstream_that_never_answers_is_504(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_raw: Callable[[RawBehaviour], Awaitable[RawUpstream]],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the gateway gives up and closes

    upstream = await serve_raw(silent)
    gateway = await gateway_before(make_gateway, upstream.url, timeout_seconds=0.5)
    started = asyncio.get_running_loop().time()
    status, headers, body = await post(http, gateway)
    elapsed = asyncio.get_running_loop().time() - started
    assert_gateway_error(status, headers, body, 504, "UPSTREAM_TIMEOUT", "upstream_timeout")
    assert 0.4 <= elapsed < 4
    assert len(upstream.heads) == 1  # it was reached: a timeout, not a refused connection


async def test_upstream_closing_mid_answer_is_502(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_raw: Callable[[RawBehaviour], Awaitable[RawUpstream]],
) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()

    upstream = await serve_raw(truncated)
    gateway = await gateway_before(make_gateway, upstream.url)
    status, headers, body = await post(http, gateway)
    assert_gateway_error(status, headers, body, 502, "UPSTREAM_UNAVAILABLE", "upstream_failed")
    assert "Retry-After" in headers


async def test_upstream_closing_a_chunked_answer_early_is_502(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_raw: Callable[[RawBehaviour], Awaitable[RawUpstream]],
) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n"
        )
        await writer.drain()

    upstream = await serve_raw(truncated)
    gateway = await gateway_before(make_gateway, upstream.url)
    status, headers, body = await post(http, gateway)
    assert_gateway_error(status, headers, body, 502, "UPSTREAM_UNAVAILABLE", "upstream_failed")


async def test_upstream_closing_without_answer_is_502(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_raw: Callable[[RawBehaviour], Awaitable[RawUpstream]],
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return  # the connection is closed with no status line

    upstream = await serve_raw(hang_up)
    gateway = await gateway_before(make_gateway, upstream.url)
    status, headers, body = await post(http, gateway)
    assert_gateway_error(status, headers, body, 502, "UPSTREAM_UNAVAILABLE", "upstream_failed")


async def test_upstream_breaking_after_the_buffer_never_looks_complete(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_raw: Callable[[RawBehaviour], Awaitable[RawUpstream]],
) -> None:
    """Past the 1 MiB buffer the status is already sent; the break must still reach the client
    as a broken answer, never as a complete 2xx."""
    size = 3 * 1024 * 1024

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * (2 * 1024 * 1024))
        await writer.drain()

    upstream = await serve_raw(truncated)
    gateway = await gateway_before(make_gateway, upstream.url)
    async with http.post(gateway.url + EVENTS, data=ANONYMOUS, headers=JSON) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


# --- what the gateway adds to the forwarded request ----------------------------------------------


SPOOFED = {
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "shop.example",
    "Forwarded": "for=203.0.113.7;proto=https",
}


async def test_forwarded_headers_from_an_untrusted_peer_are_replaced(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    status, _, _ = await post(http, gateway, headers=SPOOFED)
    assert status == 200
    forwarded = upstream.received[-1].headers
    names = [k.lower() for k, _ in forwarded]
    for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
        assert names.count(name) == 1, name
    assert "forwarded" not in names
    last = upstream.last_headers()
    assert last["x-forwarded-for"] == "127.0.0.1"
    assert last["x-forwarded-proto"] == "http"
    assert last["x-forwarded-host"] == f"127.0.0.1:{gateway.port}"


async def test_forwarded_headers_from_a_trusted_proxy_are_kept_and_appended(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(trusted_proxies=["127.0.0.0/8"])
    status, _, _ = await post(http, gateway, headers=SPOOFED)
    assert status == 200
    last = upstream.last_headers()
    assert last["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert last["x-forwarded-proto"] == "https"
    assert last["x-forwarded-host"] == "shop.example"
    assert last["forwarded"] == "for=203.0.113.7;proto=https"


async def test_forward_token_true_keeps_the_token_header(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    def keep_token(config: dict[str, Any]) -> None:
        config["routes"][0]["forward_token"] = True

    gateway = await make_gateway(keep_token)
    token = tokens.good("alice")
    body = json.dumps({"customer_ids": {"registered": "alice"}}).encode()
    status, _, _ = await post(http, gateway, body, {"X-Sdk-Auth-Token": token})
    assert status == 200
    last = upstream.last_headers()
    assert last["x-auth-status"] == "verified"
    assert last["x-sdk-auth-token"] == token
    status, _, _ = await post(http, gateway, body, {"Authorization": f"Bearer {token}"})
    assert status == 200
    assert upstream.last_headers()["authorization"] == f"Bearer {token}"


async def test_query_string_is_forwarded_exactly(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    query = "b=2&a=1&a=%2F&c=+x%20y&empty=&flag&enc=%41%7e&sym=!$'()*,;:@/?&z=%E2%82%AC"
    status, _, _ = await post(http, gateway, path=f"{EVENTS}?{query}")
    assert status == 200
    assert upstream.received[-1].path_qs == f"{EVENTS}?{query}"
    status, _, _ = await post(http, gateway, path=f"{EVENTS}?")
    assert status == 200
    assert upstream.received[-1].path_qs in (f"{EVENTS}?", EVENTS)


async def test_raw_upstream_sees_the_request_line_as_received(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    serve_raw: Callable[[RawBehaviour], Awaitable[RawUpstream]],
) -> None:
    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readexactly(len(ANONYMOUS))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    upstream = await serve_raw(ok)
    gateway = await gateway_before(make_gateway, upstream.url)
    target = f"{EVENTS}?q=%2e%2E&x=a+b"
    status, _, _ = await post(http, gateway, path=target)
    assert status == 204
    assert upstream.heads[0].split(b"\r\n")[0] == f"POST {target} HTTP/1.1".encode()
