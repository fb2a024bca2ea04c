"""The shared failure counter: Redis (or Redis Cluster), counted by every worker and replica.

One key per session, `gwfc:<project>:{<sha256 hex>}` (the braces are the Cluster hash tag),
holding the count and expiring at the end of the window fixed by the session's first failure.
Incrementing is one Lua script, so concurrent failures never lose a count. Resets are batched
(one DEL per batch) in the background: a verified request never waits for Redis.

Every call is bounded by `redis_timeout_ms`; a slow, hung or unreachable Redis counts nothing
and changes nothing else (the request is decided as if the count were zero).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from redis import asyncio as redis_asyncio
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway.base.tasks import spawn
from gateway.counters import FailureCount, SessionKey

log = logging.getLogger("gateway.counters.redis")

# KEYS[1] the session; ARGV[1] the window in ms; ARGV[2] "1" to clear it first (a reset from
# this process that had not reached Redis yet, so it cannot land after this failure).
_RECORD_FAILURE = """
if ARGV[2] == "1" then redis.call('DEL', KEYS[1]) end
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if count == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""

RESET_FLUSH_SECONDS = 0.05
RESET_BATCH = 500
MAX_PENDING_RESETS = 100_000


def redis_key(key: SessionKey) -> str:
    return f"gwfc:{key.namespace}:{{{key.digest.hex()}}}"


class RedisFailureCounter:
    backend = "redis"

    def __init__(
        self,
        *,
        url: str,
        cluster: bool,
        timeout_ms: int,
        ttl_seconds: int,
        max_connections: int = 64,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._timeout = timeout_ms / 1000
        self._window_ms = ttl_seconds * 1000
        options: dict[str, Any] = {
            "socket_timeout": self._timeout,
            "socket_connect_timeout": self._timeout,
            "max_connections": max_connections,
        }
        self._pool: redis_asyncio.BlockingConnectionPool | None = None
        if cluster:
            self._client: Any = RedisCluster.from_url(url, **options)
        else:
            # A burst past the pool waits for a connection (inside the call's budget) rather
            # than failing at once and going uncounted.
            self._pool = redis_asyncio.BlockingConnectionPool.from_url(url, timeout=None, **options)
            self._client = redis_asyncio.Redis(connection_pool=self._pool)
        self._script = self._client.register_script(_RECORD_FAILURE)
        self._pending_resets: OrderedDict[str, None] = OrderedDict()
        self._flusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.errors = 0  # calls that failed or outran the budget
        self._on_error = on_error

    async def record_failure(self, key: SessionKey) -> FailureCount | None:
        name = redis_key(key)
        clear_first = name in self._pending_resets
        if clear_first:
            del self._pending_resets[name]
        try:
            async with asyncio.timeout(self._timeout):
                count, ttl_ms = await self._script(
                    keys=[name], args=[self._window_ms, "1" if clear_first else "0"]
                )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        return FailureCount(int(count), max(1, math.ceil(int(ttl_ms) / 1000)))

    def may_hold(self, hint: int) -> bool:
        return True  # the counts live in Redis, shared with other gateways

    def reset(self, key: SessionKey) -> None:
        self._pending_resets[redis_key(key)] = None
        if len(self._pending_resets) > MAX_PENDING_RESETS:
            # Bounded while Redis is down: the oldest reset goes; its session at worst keeps
            # an old count until its window ends.
            self._pending_resets.popitem(last=False)
        if self._flusher is None:
            self._flusher = spawn(self._flush_forever())
        if len(self._pending_resets) >= RESET_BATCH:
            self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(RESET_FLUSH_SECONDS):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush_resets()

    async def flush_resets(self) -> None:
        """Send pending resets; on failure they stay pending and are tried again."""
        while self._pending_resets:
            batch = list(self._pending_resets)[:RESET_BATCH]
            try:
                async with asyncio.timeout(self._timeout * 4):
                    # One DEL for the batch (a Cluster client sends one per hash slot): a
                    # command per key cost the gateway more CPU than the requests it reset.
                    await self._client.delete(*batch)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed(exc)
                return
            for name in batch:
                self._pending_resets.pop(name, None)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._on_error()
        log.debug("failure counter call failed", extra={"fields": {"error": type(exc).__name__}})

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await self.flush_resets()
        await self._client.aclose()
        if self._pool is not None:  # a pool we made is ours to close
            await self._pool.disconnect()
