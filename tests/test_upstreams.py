"""Several upstreams: routes name theirs, `endpoints` take turns, a refusing endpoint is skipped
and the next one tried at once (nothing was sent), a written request is never sent twice, and
metrics and the access log carry the upstream's name. Real upstream servers on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.tools.sample_upstream import make_sample_upstream
from tests.conftest import GatewayFactory, Upstream, base_config, raw_request
from tests.test_tls import config_problems

SDK_CONFIG = "/v2/sdkconfig"


def get(path: str = SDK_CONFIG) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw\r\nX-App-Id: app\r\n\r\n".encode()


@pytest.fixture
async def more_upstreams() -> AsyncIterator[Callable[[], Awaitable[Upstream]]]:
    runners: list[web.AppRunner] = []

    async def start() -> Upstream:
        app = make_sample_upstream()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        port: int = runner.addresses[0][1]
        return Upstream(f"http://127.0.0.1:{port}", port, app)

    yield start
    for runner in runners:
        await runner.cleanup()


def second_route(upstream_name: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config["routes"].append(
            {
                "name": "webxp-config",
                "methods": ["GET"],
                "path": "/webxp/sdkconfig",
                "project": {"header": "X-App-Id"},
                "auth": ["none"],
                "upstream": upstream_name,
            }
        )

    return edit


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_routes_reach_the_upstream_they_name_and_the_log_says_which(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    more_upstreams: Callable[[], Awaitable[Upstream]],
) -> None:
    webxp = await more_upstreams()
    gateway = await make_gateway(second_route("webxp"), upstreams={"webxp": {"url": webxp.url}})
    assert (await raw_request(gateway.port, get())).status == 200
    assert (await raw_request(gateway.port, get("/webxp/sdkconfig"))).status == 200
    assert [r.path_qs for r in upstream.received] == [SDK_CONFIG]
    assert [r.path_qs for r in webxp.received] == ["/webxp/sdkconfig"]
    records = await gateway.access_log(2)
    assert [r["upstream"] for r in records] == ["default", "webxp"]


async def test_a_failing_named_upstream_is_counted_under_its_name(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(
        second_route("webxp"),
        upstreams={"webxp": {"url": f"http://127.0.0.1:{closed_port()}"}},
    )
    answer = await raw_request(gateway.port, get("/webxp/sdkconfig"))
    assert answer.status == 502
    metrics = gateway.server.metrics
    metrics.flush()
    errors = metrics.upstream_errors
    assert errors.labels("webxp", "connect")._value.get() == 1
    assert errors.labels("default", "connect")._value.get() == 0


async def test_endpoints_take_turns_for_new_connections(
    make_gateway: GatewayFactory, more_upstreams: Callable[[], Awaitable[Upstream]]
) -> None:
    first, second = await more_upstreams(), await more_upstreams()
    gateway = await make_gateway(
        upstream={
            "url": "http://tracking.example:8000",
            "endpoints": [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"],
        }
    )
    # Concurrent requests need concurrent connections: each new one goes to the next endpoint.
    answers = await asyncio.gather(*(raw_request(gateway.port, get()) for _ in range(8)))
    assert [a.status for a in answers] == [200] * 8
    assert first.received
    assert second.received
    assert len(first.received) + len(second.received) == 8
    host = {k.lower(): v for k, v in first.received[0].headers}["host"]
    assert host == "tracking.example:8000"  # the URL's, whatever address was connected to


async def test_a_refusing_endpoint_is_skipped_and_no_request_fails(
    make_gateway: GatewayFactory, more_upstreams: Callable[[], Awaitable[Upstream]]
) -> None:
    live = await more_upstreams()
    gateway = await make_gateway(
        upstream={
            "url": "http://tracking.example",
            "endpoints": [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{live.port}"],
        }
    )
    answers = await asyncio.gather(*(raw_request(gateway.port, get()) for _ in range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert len(live.received) == 6


async def test_a_written_request_is_never_sent_again(make_gateway: GatewayFactory) -> None:
    """The first endpoint reads the request and resets the connection; the second, which
    would answer, must not get it: the gateway cannot know whether the first acted on it."""
    seen: list[int] = []

    async def reset_after_reading(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.append(1)
        writer.transport.abort()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.append(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    servers = [
        await asyncio.start_server(reset_after_reading, "127.0.0.1", 0),
        await asyncio.start_server(answer, "127.0.0.1", 0),
    ]
    try:
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        gateway = await make_gateway(
            upstream={
                "url": "http://tracking.example",
                "endpoints": [f"127.0.0.1:{p}" for p in ports],
            }
        )
        assert (await raw_request(gateway.port, get())).status == 502
        assert seen == [1]
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        pytest.param(
            {"upstreams": {"default": {"url": "http://a:1"}}},
            "upstreams.default",
            id="default_taken",
        ),
        pytest.param(
            {"upstream": {"url": "http://a:1", "endpoints": ["nowhere"]}},
            "upstream.endpoints",
            id="bad_endpoint",
        ),
    ],
)
def test_upstream_names_and_endpoints_are_checked(
    tmp_path: Path, overrides: dict[str, Any], where: str
) -> None:
    problems = config_problems(tmp_path, overrides)
    assert any(p.path == where or p.path.startswith(where + "[") for p in problems), problems


def test_a_route_naming_an_unknown_upstream_is_a_problem(tmp_path: Path) -> None:
    routes = base_config("http://127.0.0.1:1")["routes"]
    routes[2]["upstream"] = "elsewhere"
    problems = config_problems(tmp_path, {"routes": routes})
    assert "routes[2].upstream" in [p.path for p in problems], problems
