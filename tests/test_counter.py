"""The failure counter: one contract for every backend, then the session limit end to end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from redis.asyncio import Redis

from gateway.base.clock import ManualClock
from gateway.counters import FailureCounter, SessionKey, session_hint, session_key
from gateway.counters.memory import MemoryFailureCounter
from gateway.counters.redis import RedisFailureCounter
from tests.conftest import NOW, GatewayFactory, RunningGateway, Tokens, Upstream
from tests.redis_support import RedisProcess


@dataclass
class CounterUnderTest:
    """A backend plus a way to move its time: the manual clock, or Redis TTLs moved down."""

    counter: FailureCounter
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


async def _age_redis_keys(client: Redis, seconds: float) -> None:
    async for name in client.scan_iter("gwfc:*"):
        remaining = await client.pttl(name)
        if remaining - seconds * 1000 <= 0:
            await client.delete(name)
        else:
            await client.pexpire(name, int(remaining - seconds * 1000))


CounterFactory = Callable[[int, int], Awaitable[CounterUnderTest]]


@pytest.fixture(params=["memory", "redis"])
async def make_counter(
    request: pytest.FixtureRequest, clock: ManualClock
) -> AsyncIterator[CounterFactory]:
    made: list[FailureCounter] = []
    admin: Redis | None = None

    async def make(ttl_seconds: int, max_sessions: int) -> CounterUnderTest:
        nonlocal admin
        counter: FailureCounter
        if request.param == "memory":
            counter = MemoryFailureCounter(
                ttl_seconds=ttl_seconds, max_sessions=max_sessions, clock=clock
            )

            async def advance(seconds: float) -> None:
                clock.advance(seconds)

        else:
            server: RedisProcess = request.getfixturevalue("shared_redis")
            admin = Redis.from_url(server.url)
            await admin.flushall()
            counter = RedisFailureCounter(
                url=server.url, cluster=False, timeout_ms=1000, ttl_seconds=ttl_seconds
            )
            client = admin

            async def advance(seconds: float) -> None:
                await _age_redis_keys(client, seconds)

        made.append(counter)
        return CounterUnderTest(counter, advance)

    yield make
    for counter in made:
        await counter.close()
    if admin is not None:
        await admin.aclose()


KEY = session_key("app", "app", "session", "s-1")
OTHER = session_key("app", "app", "session", "s-2")


async def test_failures_count_up_within_the_window(make_counter: CounterFactory) -> None:
    under_test = await make_counter(1800, 100)
    counts = []
    for _ in range(3):
        result = await under_test.counter.record_failure(KEY)
        assert result is not None
        counts.append(result.count)
        await under_test.advance(100)
    assert counts == [1, 2, 3]


async def test_window_is_fixed_from_the_first_failure(make_counter: CounterFactory) -> None:
    under_test = await make_counter(1800, 100)
    counter = under_test.counter
    first = await counter.record_failure(KEY)
    assert first is not None
    assert first.retry_after == 1800
    await under_test.advance(600.5)
    later = await counter.record_failure(KEY)
    assert later is not None
    assert later.retry_after == 1200  # ceil(1800 - 600.5), not a fresh 1800
    await under_test.advance(1200)
    fresh = await counter.record_failure(KEY)
    assert fresh is not None
    assert (fresh.count, fresh.retry_after) == (1, 1800)


async def test_reset_clears_only_that_session(make_counter: CounterFactory) -> None:
    counter = (await make_counter(1800, 100)).counter
    await counter.record_failure(KEY)
    await counter.record_failure(OTHER)
    counter.reset(KEY)
    after_reset = await counter.record_failure(KEY)
    other = await counter.record_failure(OTHER)
    assert after_reset is not None
    assert other is not None
    assert (after_reset.count, other.count) == (1, 2)


async def test_least_recently_used_sessions_are_evicted(clock: ManualClock) -> None:
    counter = MemoryFailureCounter(ttl_seconds=1800, max_sessions=2, clock=clock)
    keys = [session_key("app", "app", "session", f"s-{i}") for i in range(3)]
    for key in keys:
        await counter.record_failure(key)
    await counter.record_failure(keys[1])
    first_again = await counter.record_failure(keys[0])
    assert first_again is not None
    assert first_again.count == 1  # evicted when s-2 arrived


def test_session_keys_hold_no_user_id() -> None:
    key = session_key("app", "app", "user", "alice@example.com")
    assert b"alice" not in key.digest
    assert key.namespace == "app"
    assert len(key.digest) == 32
    assert key != session_key("app", "other", "user", "alice@example.com")
    assert key != session_key("app", "app", "session", "alice@example.com")


# --- end to end ------------------------------------------------------------------------------

EVENTS = "/track/v2/projects/app/customers/events"


async def send(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    headers: dict[str, str],
    user: str = "alice",
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    body = json.dumps({"customer_ids": {"registered": user}})
    all_headers = {"Content-Type": "application/json", **headers}
    async with http.post(gateway.url + EVENTS, data=body, headers=all_headers) as response:
        return response.status, await response.json(), CIMultiDict(response.headers)


async def test_session_is_limited_after_threshold(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens, upstream: Upstream
) -> None:
    session = {"X-Session-Id": "device-1", "X-Sdk-Auth-Token": tokens.expired()}
    statuses = [(await send(http, gateway, session))[0] for _ in range(10)]
    assert statuses == [401] * 10
    gateway.clock.advance(100)
    status, body, headers = await send(http, gateway, session)
    assert status == 429
    assert list(body) == ["token_expired", "error"]
    assert body["token_expired"] is True
    assert body["error"]["code"] == "AUTH_FAILURE_LIMIT"
    assert body["error"]["cause"] == "TOKEN_EXPIRED"
    assert headers["Retry-After"] == "1700"
    # The access log says what the client got: the limit, for the underlying failure.
    logged = (await gateway.access_log(11))[-1]
    assert (logged["status"], logged["code"], logged["reason"]) == (
        429,
        "AUTH_FAILURE_LIMIT",
        "session_limited",
    )
    # Another session of the same user is not limited.
    other = {"X-Session-Id": "device-2", "X-Sdk-Auth-Token": tokens.expired()}
    assert (await send(http, gateway, other))[0] == 401
    # A request that passes is forwarded even for a limited session, and resets it.
    good = {"X-Session-Id": "device-1", "X-Sdk-Auth-Token": tokens.good()}
    assert (await send(http, gateway, good))[0] == 200
    assert (await send(http, gateway, session))[0] == 401
    assert len(upstream.received) == 1


async def test_only_token_failures_count(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    session = {"X-Session-Id": "device-1", "X-User-Id": "bob"}  # body says alice: 400
    statuses = {(await send(http, gateway, session))[0] for _ in range(12)}
    assert statuses == {400}
    rejected = {"X-Session-Id": "device-1", "X-Sdk-Auth-Token": tokens.good("mallory")}
    assert (await send(http, gateway, rejected))[0] == 401


async def test_without_session_id_the_identity_is_the_session(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    bad = {"X-Sdk-Auth-Token": tokens.good("mallory")}
    for _ in range(10):
        assert (await send(http, gateway, bad, user="alice"))[0] == 401
    assert (await send(http, gateway, bad, user="alice"))[0] == 429
    assert (await send(http, gateway, bad, user="carol"))[0] == 401


async def test_monitor_counts_but_never_limits(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens, upstream: Upstream
) -> None:
    def monitor(config: dict[str, Any]) -> None:
        config["projects"]["app"]["mode"] = "monitor"

    gateway = await make_gateway(monitor)
    session = {"X-Session-Id": "device-1", "X-Sdk-Auth-Token": tokens.expired()}
    statuses = {(await send(http, gateway, session))[0] for _ in range(15)}
    assert statuses == {200}
    assert len(upstream.received) == 15
    counter = gateway.server.pipeline.counter
    assert isinstance(counter, MemoryFailureCounter)
    assert len(counter) == 1


async def test_threshold_is_configurable(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    gateway = await make_gateway(failure_counter={"threshold": 2, "session_ttl_seconds": 60})
    session = {"X-Session-Id": "d", "X-Sdk-Auth-Token": tokens.mint(tokens.claims(), alg="RS384")}
    statuses = [(await send(http, gateway, session))[0] for _ in range(3)]
    assert statuses == [401, 401, 429]
    gateway.clock.advance(60)
    assert (await send(http, gateway, session))[0] == 401
    assert gateway.clock.now() == NOW + 60


# --- may_hold: the pre-check that spares a verified request the session key's SHA-256 ----------


async def test_a_session_with_a_failure_counted_may_be_held(make_counter: CounterFactory) -> None:
    counter = (await make_counter(1800, 100)).counter
    await counter.record_failure(KEY)
    assert counter.may_hold(session_hint(("app", "app", "session", "s-1")))
    assert counter.may_hold(KEY.hint)


async def test_the_memory_counter_says_which_sessions_it_cannot_hold(clock: ManualClock) -> None:
    counter = MemoryFailureCounter(ttl_seconds=1800, max_sessions=2, clock=clock)
    assert not counter.may_hold(KEY.hint)
    await counter.record_failure(KEY)
    await counter.record_failure(KEY)
    assert counter.may_hold(KEY.hint)
    assert not counter.may_hold(OTHER.hint)
    counter.reset(KEY)
    assert not counter.may_hold(KEY.hint)
    counter.reset(KEY)  # nothing held: changes nothing
    assert not counter.may_hold(KEY.hint)
    # Evicted as least recently used: no longer held either.
    third = session_key("app", "app", "session", "s-3")
    for key in (KEY, OTHER, third):
        await counter.record_failure(key)
    assert [counter.may_hold(k.hint) for k in (KEY, OTHER, third)] == [False, True, True]


async def test_sessions_sharing_a_hint_keep_it_until_the_last_is_reset(clock: ManualClock) -> None:
    counter = MemoryFailureCounter(ttl_seconds=1800, max_sessions=100, clock=clock)
    # Two sessions whose hashes collide (forced here: rare with Python's randomised hash).
    first, second = (SessionKey("app", bytes([i]) * 32, hint=7) for i in (1, 2))
    await counter.record_failure(first)
    await counter.record_failure(second)
    counter.reset(first)
    assert counter.may_hold(7)
    counter.reset(second)
    assert not counter.may_hold(7)
