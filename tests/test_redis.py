"""The Redis failure counter against real `redis-server` processes: outages, pauses, restarts,
concurrency, Redis Cluster, and separate gateway processes counting together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from gateway.counters import session_key
from gateway.counters.redis import RESET_BATCH, RedisFailureCounter, redis_key
from tests.conftest import (
    GatewayFactory,
    RunningGateway,
    Tokens,
    eventually,
    free_port,
    gateway_process,
)
from tests.redis_support import RedisCluster, RedisProcess

KEY = session_key("app", "app", "session", "s-1")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def counter(redis_server: RedisProcess) -> AsyncIterator[RedisFailureCounter]:
    made = RedisFailureCounter(url=redis_server.url, cluster=False, timeout_ms=50, ttl_seconds=1800)
    yield made
    await made.close()


async def test_keys_hold_project_and_digest_only(
    counter: RedisFailureCounter, redis_server: RedisProcess
) -> None:
    user_key = session_key("app", "app", "user", "alice@example.com")
    await counter.record_failure(user_key)
    keys = redis_server.cli("--scan").split()
    assert keys == [redis_key(user_key)]
    assert keys[0].startswith("gwfc:app:{")
    assert "alice" not in keys[0]
    ttl = int(redis_server.cli("ttl", keys[0]))
    assert 1790 <= ttl <= 1800


async def test_reset_reaches_redis_in_the_background(
    counter: RedisFailureCounter, redis_server: RedisProcess
) -> None:
    await counter.record_failure(KEY)
    started = time.monotonic()
    counter.reset(KEY)  # returns at once: no round trip on the success path
    assert time.monotonic() - started < 0.01
    async with Redis.from_url(redis_server.url) as client:

        async def gone() -> bool:
            return not await client.exists(redis_key(KEY))

        await eventually(gone, "the reset to reach Redis")


async def test_stopped_redis_counts_nothing_and_recovers(
    counter: RedisFailureCounter, redis_server: RedisProcess
) -> None:
    assert await counter.record_failure(KEY) is not None
    redis_server.stop()
    started = time.monotonic()
    assert await counter.record_failure(KEY) is None
    assert time.monotonic() - started < 0.5
    assert counter.errors >= 1
    redis_server.start()  # same port, empty: a fresh server

    async def counting() -> bool:
        return await counter.record_failure(KEY) is not None

    await eventually(counting, "the counter to reconnect")


async def test_paused_redis_never_stalls_past_the_budget(
    counter: RedisFailureCounter, redis_server: RedisProcess
) -> None:
    async def counting() -> bool:
        return await counter.record_failure(KEY) is not None

    # Connected first: on a loaded machine the first connection alone can take the 50 ms.
    await eventually(counting, "the counter to reach Redis")
    redis_server.pause()
    try:
        for _ in range(3):
            started = time.monotonic()
            assert await counter.record_failure(KEY) is None
            assert time.monotonic() - started < 0.3  # budget 50 ms, plus scheduling slack
    finally:
        redis_server.resume()

    await eventually(counting, "the counter to recover after SIGCONT")


async def test_resets_past_one_batch_clear_exactly_their_sessions(
    counter: RedisFailureCounter, redis_server: RedisProcess
) -> None:
    keys = [session_key("app", "app", "session", f"s-{i}") for i in range(RESET_BATCH + 100)]
    kept = session_key("app", "app", "session", "not reset")
    for key in [*keys, kept]:
        assert await counter.record_failure(key) is not None
    for key in keys:
        counter.reset(key)
    await counter.flush_resets()
    assert redis_server.cli("--scan").split() == [redis_key(kept)]


async def test_resets_queued_during_an_outage_are_sent_later(
    counter: RedisFailureCounter, redis_server: RedisProcess
) -> None:
    await counter.record_failure(KEY)
    redis_server.pause()
    try:
        counter.reset(KEY)
        await counter.flush_resets()  # fails inside the budget; the reset stays pending
    finally:
        redis_server.resume()
    async with Redis.from_url(redis_server.url) as client:

        async def gone() -> bool:
            return not await client.exists(redis_key(KEY))

        await eventually(gone, "the pending reset to be retried")


async def test_concurrent_failures_lose_no_increment(redis_server: RedisProcess) -> None:
    counters = [
        RedisFailureCounter(url=redis_server.url, cluster=False, timeout_ms=2000, ttl_seconds=60)
        for _ in range(2)
    ]
    try:
        results = await asyncio.gather(*(counters[i % 2].record_failure(KEY) for i in range(200)))
    finally:
        for made in counters:
            await made.close()
    counts = sorted(r.count for r in results if r is not None)
    assert counts == list(range(1, 201))


async def test_redis_cluster(tmp_path: Path) -> None:
    cluster = RedisCluster(tmp_path)
    cluster.start()
    # A generous budget: this test is about slots and resets, not about a slow Redis.
    made = RedisFailureCounter(url=cluster.url, cluster=True, timeout_ms=3000, ttl_seconds=60)
    try:
        keys = [session_key("app", "app", "session", f"s-{i}") for i in range(60)]
        for key in keys:
            first = await made.record_failure(key)
            second = await made.record_failure(key)
            assert first is not None
            assert second is not None
            assert (first.count, second.count) == (1, 2)
        sizes = [int(node.cli("dbsize")) for node in cluster.nodes]
        assert sum(sizes) == 60
        assert sum(1 for size in sizes if size) >= 2  # sessions spread over the primaries
        for key in keys[:10]:
            made.reset(key)
        await made.flush_resets()
        assert sum(int(node.cli("dbsize")) for node in cluster.nodes) == 50
        again = await made.record_failure(keys[0])
        assert again is not None
        assert again.count == 1
    finally:
        await made.close()
        cluster.stop()


# --- through the gateway -----------------------------------------------------------------------

EVENTS = "/track/v2/projects/app/customers/events"


async def send_failure(http: aiohttp.ClientSession, url: str, session: str) -> int:
    body = json.dumps({"customer_ids": {"registered": "alice"}})
    headers = {"Content-Type": "application/json", "X-Session-Id": session}
    async with http.post(url + EVENTS, data=body, headers=headers) as response:
        return response.status


async def test_gateway_with_redis_limits_and_survives_an_outage(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    redis_server: RedisProcess,
    tokens: Tokens,
) -> None:
    gateway: RunningGateway = await make_gateway(
        failure_counter={
            "backend": "redis",
            "redis_url": redis_server.url,
            "redis_timeout_ms": 50,
            "threshold": 3,
        }
    )
    statuses = [await send_failure(http, gateway.url, "d-1") for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    redis_server.pause()
    try:
        statuses = [await send_failure(http, gateway.url, "d-2") for _ in range(5)]
        assert statuses == [401] * 5  # nothing counted, nothing else changes
        async with http.get(gateway.admin_url + "/readyz") as ready:
            assert ready.status == 200
    finally:
        redis_server.resume()
    counter = gateway.server.pipeline.counter
    assert isinstance(counter, RedisFailureCounter)
    assert counter.errors >= 5


def _write_process_config(tmp_path: Path, name: str, upstream_url: str, redis_url: str) -> Path:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin_listen": f"127.0.0.1:{free_port()}",
        "upstream": {"url": upstream_url},
        "failure_counter": {"backend": "redis", "redis_url": redis_url, "threshold": 3},
        "projects": {"app": {"mode": "required", "keys": [{"id": "k", "pem_file": "keys/a.pem"}]}},
        "identity": [{"json": "customer_ids.registered"}],
        "token": [{"header": "X-Sdk-Auth-Token"}],
        "session": [{"header": "X-Session-Id"}],
        "routes": [
            {
                "name": "events",
                "methods": ["POST"],
                "path": "/track/v2/projects/{project}/customers/events",
                "auth": ["sdk_jwt"],
            }
        ],
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


async def test_two_gateway_processes_count_together(
    http: aiohttp.ClientSession,
    tmp_path: Path,
    redis_server: RedisProcess,
    tokens: Tokens,
    key_a: Any,
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "a.pem").write_text(key_a.public_pem)
    configs = [
        _write_process_config(tmp_path, f"gw{i}.yaml", "http://127.0.0.1:9", redis_server.url)
        for i in range(2)
    ]
    async with contextlib.AsyncExitStack() as running:
        urls: list[str] = []
        processes: list[asyncio.subprocess.Process] = []
        for path in configs:
            settings = yaml.safe_load(path.read_text())
            urls.append(f"http://{settings['listen']}")
            started = gateway_process(
                path, settings["admin_listen"], what="gateway process readiness"
            )
            processes.append(await running.enter_async_context(started))
        statuses = [await send_failure(http, urls[i % 2], "shared") for i in range(4)]
        assert statuses == [401, 401, 401, 429]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            async with asyncio.timeout(20):
                assert await process.wait() == 0
