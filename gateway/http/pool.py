"""A keep-alive pool of upstream connections: at most `max_connections` open, waits for one
bounded by the connect timeout, each exchange under a deadline, idle ones closed before the
upstream's own keep-alive timeout would close them under a request. One timer sweeps both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Final

from gateway.http.errors import UpstreamUnreachable
from gateway.http.outbox import Outbox
from gateway.http.upstream_connection import UpstreamConnection

log: Final = logging.getLogger("gateway.upstream")


SKIP_SECONDS: Final = 5.0  # an endpoint that refused a connection is not tried again for this long


@dataclass(frozen=True, slots=True)
class Destination:
    """Where the pool connects: an address (or `endpoints` to take turns among, each HOST and
    PORT), and for HTTPS the TLS context and the name to send (SNI) and verify."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_name: str | None = None
    endpoints: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


class ConnectionPool:
    """At most `max_connections` open at once; idle ones are reused, newest first."""

    def __init__(
        self,
        destination: Destination,
        max_connections: int,
        connect_timeout: float,
        exchange_timeout: float,
        idle_timeout: float,
        outbox: Outbox,
    ):
        self._destination = destination
        self._addresses = destination.endpoints or ((destination.host, destination.port),)
        self._turn = 0  # the next address to connect to, round-robin
        self._skipped_until = [0.0] * len(self._addresses)  # loop time, per address
        self._tls_logged = -math.inf  # when a TLS failure was last logged
        self._outbox = outbox
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._exchange_timeout = exchange_timeout
        self._idle_timeout = idle_timeout
        self._idle: deque[UpstreamConnection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_use: set[UpstreamConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def _sweep(self) -> None:
        """Expires exchanges past their deadline and closes connections idle past the idle
        timeout: one timer for the pool instead of one per request (a timer handle to create
        and cancel, on the hot path)."""
        interval = min(0.05, self._exchange_timeout / 10, self._idle_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for connection in [c for c in self._in_use if c.deadline <= now]:
                connection.expire()
            while self._idle and self._idle[0].idle_since <= now - self._idle_timeout:
                self._discard(self._idle.popleft())  # the oldest first: reuse takes the newest

    async def exchange(self) -> UpstreamConnection:
        """A connection for one exchange, whose reads fail with TimeoutError once the exchange
        has taken `exchange_timeout`; hand it back with `release`."""
        return self.exchange_idle() or self._begin(await self._acquire())

    def exchange_idle(self) -> UpstreamConnection | None:
        """`exchange` without waiting: an idle connection, or None when there is none."""
        connection = self._take_idle()
        return None if connection is None else self._begin(connection)

    def _begin(self, connection: UpstreamConnection) -> UpstreamConnection:
        connection.deadline = connection.time() + self._exchange_timeout
        self._in_use.add(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return connection

    def _take_idle(self) -> UpstreamConnection | None:
        horizon = None
        while self._idle:
            connection = self._idle.pop()
            if horizon is None:
                horizon = connection.time() - self._idle_timeout
            if connection.usable() and connection.idle_since > horizon:
                return connection
            self._discard(connection)
        return None

    async def _acquire(self) -> UpstreamConnection:
        """A connection within `connect_timeout`: a free one when `max_connections` are open
        (answers held by clients that stopped reading must not queue requests without end),
        else a new one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        while self._open >= self._max:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken just as it gave up: the turn passes to the next one
                if isinstance(exc, TimeoutError):
                    raise UpstreamUnreachable from None
                raise
            idle = self._take_idle()
            if idle is not None:
                return idle
        self._open += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await self._connect()
        except (OSError, TimeoutError) as exc:
            self._open -= 1
            self._wake()
            if isinstance(exc, ssl.SSLError):
                self._tls_failed(exc, loop.time())
            raise UpstreamUnreachable from None

    async def _connect(self) -> UpstreamConnection:
        """A new connection to the next address in turn. One that refuses is skipped for a
        while and the next one tried, once: nothing was sent yet."""
        first = self._next_address()
        try:
            return await self._connect_to(first)
        except ConnectionRefusedError:
            self._skipped_until[first] = asyncio.get_running_loop().time() + SKIP_SECONDS
            second = self._next_address()
            if second == first:
                raise
            return await self._connect_to(second)

    def _next_address(self) -> int:
        """The next address in turn that is not being skipped (if all are, the next anyway)."""
        now = asyncio.get_running_loop().time()
        count = len(self._addresses)
        for step in range(count):
            index = (self._turn + step) % count
            if self._skipped_until[index] <= now:
                break
        else:
            index = self._turn % count
        self._turn = index + 1
        return index

    async def _connect_to(self, index: int) -> UpstreamConnection:
        where = self._destination
        host, port = self._addresses[index]
        _, connection = await asyncio.get_running_loop().create_connection(
            lambda: UpstreamConnection(self._outbox),
            host,
            port,
            ssl=where.tls,
            server_hostname=(where.server_name or where.host) if where.tls else None,
        )
        return connection

    def _tls_failed(self, exc: ssl.SSLError, now: float) -> None:
        """One line naming the upstream and the TLS error, at most once a second: a bad
        certificate fails every connection."""
        if now - self._tls_logged >= 1.0:
            self._tls_logged = now
            log.error(
                "upstream TLS handshake failed",
                extra={"fields": {"upstream": str(self._destination), "error": str(exc)}},
            )

    def release(self, connection: UpstreamConnection) -> None:
        """The exchange is over: the connection goes back to the pool if its answer was read
        whole and nothing about it is in doubt, else it is closed."""
        self._in_use.discard(connection)
        connection.deadline = math.inf
        if connection.finished() and connection.usable():
            connection.idle_since = connection.time()
            self._idle.append(connection)
            self._wake()
        else:
            self._discard(connection)

    def _discard(self, connection: UpstreamConnection) -> None:
        connection.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._idle.pop().close()
        self._open = 0
        await asyncio.sleep(0)  # let the transports finish closing
