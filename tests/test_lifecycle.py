"""Hot reload and graceful drain, in-process and against the real `gateway run` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import (
    GatewayFactory,
    KeyPair,
    RunningGateway,
    SlowUpstream,
    Tokens,
    Upstream,
    base_config,
    eventually,
    free_port,
    gateway_process,
    write_config,
)

EVENTS = "/track/v2/projects/app/customers/events"
IDENTIFIED = {"customer_ids": {"registered": "alice"}}


async def post(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    body: dict[str, Any] = IDENTIFIED,
) -> tuple[int, dict[str, Any]]:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(url + EVENTS, data=json.dumps(body), headers=all_headers) as r:
        return r.status, await r.json()


def edit_config(gateway: RunningGateway, change: Callable[[dict[str, Any]], None]) -> None:
    path = gateway.server.config.source
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


async def reload(http: aiohttp.ClientSession, gateway: RunningGateway) -> tuple[int, Any]:
    async with http.post(gateway.admin_url + "/-/reload") as response:
        return response.status, await response.json()


async def test_removing_a_key_fails_its_cached_tokens_at_once(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    token = tokens.good()
    assert (await post(http, gateway.url, {"X-Sdk-Auth-Token": token}))[0] == 200
    assert (await post(http, gateway.url, {"X-Sdk-Auth-Token": token}))[0] == 200  # cached

    def rotate(config: dict[str, Any]) -> None:
        config["projects"]["app"]["keys"] = [{"id": "key-b", "pem_file": "keys/b.pem"}]

    edit_config(gateway, rotate)
    status, body = await reload(http, gateway)
    assert status == 200
    assert body["config_digest"] == gateway.server.config.digest
    status, answer = await post(http, gateway.url, {"X-Sdk-Auth-Token": token})
    assert (status, answer["error"]["reason"]) == (401, "kid_unknown")


async def test_unchanged_project_keeps_its_cached_tokens_across_a_reload(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    token = tokens.good()
    assert (await post(http, gateway.url, {"X-Sdk-Auth-Token": token}))[0] == 200
    edit_config(gateway, lambda c: c["projects"].update(other={"mode": "disabled"}))
    assert (await reload(http, gateway))[0] == 200
    metrics = gateway.server.metrics

    def misses() -> float | None:
        metrics.flush()
        labels = {"result": "miss"}
        return metrics.registry.get_sample_value("gateway_verified_token_cache_total", labels)

    before = misses()
    assert (await post(http, gateway.url, {"X-Sdk-Auth-Token": token}))[0] == 200
    assert misses() == before


async def test_invalid_or_restart_only_reload_is_refused(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    digest = gateway.server.config.digest
    edit_config(gateway, lambda c: c["projects"]["app"].update(mode="strict"))
    status, body = await reload(http, gateway)
    assert status == 422
    assert any(p.startswith("projects.app.mode:") for p in body["problems"])
    edit_config(gateway, lambda c: c["projects"]["app"].update(mode="required"))
    edit_config(gateway, lambda c: c.update(listen="127.0.0.1:1"))
    status, body = await reload(http, gateway)
    assert status == 422
    assert body["problems"][0] == "listen: changes only on restart"
    assert gateway.server.config.digest == digest
    assert (await post(http, gateway.url, {"X-Sdk-Auth-Token": tokens.good()}))[0] == 200


async def test_reload_switches_upstream(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    second = web.Application()
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"second": True})

    second.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(second)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        edit_config(gateway, lambda c: c["upstream"].update(url=f"http://127.0.0.1:{port}"))
        assert (await reload(http, gateway))[0] == 200
        async with http.post(gateway.url + EVENTS, data=b"{}") as response:
            assert await response.json() == {"second": True}
        assert seen == [EVENTS]
    finally:
        await runner.cleanup()


async def test_monitor_to_required_rollout_by_reload(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    gateway = await make_gateway(lambda c: c["projects"]["app"].update(mode="monitor"))
    assert (await post(http, gateway.url))[0] == 200
    edit_config(gateway, lambda c: c["projects"]["app"].update(mode="required"))
    assert (await reload(http, gateway))[0] == 200
    assert (await post(http, gateway.url))[0] == 401
    edit_config(gateway, lambda c: c["projects"]["app"].update(mode="monitor"))  # roll back
    assert (await reload(http, gateway))[0] == 200
    assert (await post(http, gateway.url))[0] == 200


# --- the real process --------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    url: str
    admin: str
    config: Path


StartProcess = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def start_process(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair
) -> AsyncIterator[StartProcess]:
    async with contextlib.AsyncExitStack() as processes:

        async def start(upstream_url: str, **overrides: Any) -> GatewayProcess:
            config = base_config(upstream_url)
            config.update(
                listen=f"127.0.0.1:{free_port()}",
                admin_listen=f"127.0.0.1:{free_port()}",
                **overrides,
            )
            path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
            process = await processes.enter_async_context(
                gateway_process(path, config["admin_listen"], what="readiness")
            )
            return GatewayProcess(
                process, f"http://{config['listen']}", f"http://{config['admin_listen']}", path
            )

        yield start


async def test_sigterm_drains_and_finishes_requests_in_flight(
    http: aiohttp.ClientSession, slow_upstream: SlowUpstream, start_process: StartProcess
) -> None:
    gateway = await start_process(
        slow_upstream.url, shutdown={"drain_delay_seconds": 1.0, "grace_seconds": 10}
    )
    anonymous_body = {"customer_ids": {"cookie": "c-1"}}
    held = asyncio.ensure_future(post(http, gateway.url, {"X-Hold": "1"}, anonymous_body))
    async with asyncio.timeout(10):
        await slow_upstream.arrived.wait()
    gateway.process.send_signal(signal.SIGTERM)

    async def unready() -> bool:
        async with http.get(gateway.admin + "/readyz") as response:
            return response.status == 503

    await eventually(unready, "readyz to turn 503")
    # Still served during the drain delay, for load balancers that have not noticed yet.
    anonymous = {"Content-Type": "application/json"}
    async with http.post(gateway.url + EVENTS, data=b"{}", headers=anonymous) as response:
        assert response.status == 200
    slow_upstream.release.set()
    status, _ = await held
    assert status == 200
    async with asyncio.timeout(20):
        assert await gateway.process.wait() == 0


async def test_reload_under_load_fails_no_request(
    http: aiohttp.ClientSession, upstream: Upstream, start_process: StartProcess, tokens: Tokens
) -> None:
    gateway = await start_process(upstream.url)
    tokens.clock.set(time.time())
    token = tokens.good()
    failures: list[int] = []
    done = asyncio.Event()

    async def client() -> int:
        sent = 0
        while not done.is_set():
            status, _ = await post(http, gateway.url, {"X-Sdk-Auth-Token": token})
            if status != 200:
                failures.append(status)
            sent += 1
        return sent

    clients = [asyncio.ensure_future(client()) for _ in range(8)]
    try:
        for round_number in range(6):
            config = yaml.safe_load(gateway.config.read_text())
            config["projects"]["app"]["expiry_warning_seconds"] = 100 + round_number
            gateway.config.write_text(yaml.safe_dump(config))
            if round_number % 2:
                gateway.process.send_signal(signal.SIGHUP)
            else:
                async with http.post(gateway.admin + "/-/reload") as response:
                    assert response.status == 200
            await asyncio.sleep(0.1)  # let traffic flow between reloads (pacing, not sync)
    finally:
        done.set()
        sent = sum(await asyncio.gather(*clients))
    assert failures == []
    assert sent > 50
    gateway.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        assert await gateway.process.wait() == 0


async def test_request_after_the_listener_closed_is_shutting_down(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    # A keep-alive connection that sends another request once the drain has closed the
    # listener: answered 503 SHUTTING_DOWN on a closing connection, never forwarded.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        request = f"POST {EVENTS} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode()
        writer.write(request)
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        length = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        gateway.server.pipeline.stopping = True  # what stop() sets as it closes the listener
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert head.startswith("HTTP/1.1 503")
        assert "Connection: close" in head
        length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
        body = json.loads(await reader.readexactly(length))
        assert body["error"]["code"] == "SHUTTING_DOWN"
        assert len(upstream.received) == 1
    finally:
        writer.close()
