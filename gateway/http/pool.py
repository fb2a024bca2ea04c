"""Connections to the upstream: a keep-alive pool of at most `max_connections`, each connection
reading into a buffer it pauses past a bound, each exchange under a deadline one timer sweeps.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import cast

from gateway.http.errors import UpstreamBroken, UpstreamUnreachable
from gateway.http.outbox import Outbox


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection: bytes land in a buffer, and a reader waits at most once per
    segment that arrives (asyncio streams cost a future and a callback per read)."""

    READ_PAUSE_BYTES = 4 << 20  # stop reading from the socket past this much unconsumed

    def __init__(self, outbox: Outbox) -> None:
        self.transport: asyncio.Transport | None = None
        self._outbox = outbox
        self._loop = asyncio.get_running_loop()  # asked once: each call costs a getpid()
        self._buffer = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.deadline = math.inf  # loop time; the pool's sweeper expires reads past it
        self._timed_out = False

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self.READ_PAUSE_BYTES and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the exchange's deadline ---------------------------------------------------------------

    def expire(self) -> None:
        """The exchange outlived its deadline: the read under way, and any later one, raise
        TimeoutError."""
        self.deadline = math.inf
        self._timed_out = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def time(self) -> float:
        return self._loop.time()

    # --- reading -------------------------------------------------------------------------------

    def _more(self, wanted: int) -> asyncio.Future[None]:
        """What to await for more bytes (a future, not a coroutine: one object less per wait)."""
        if self._timed_out:
            raise TimeoutError
        if self._eof:
            raise asyncio.IncompleteReadError(bytes(self._buffer), wanted)
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = waiter = self._loop.create_future()
        return waiter

    def _take(self, size: int) -> bytes:
        taken = bytes(self._buffer[:size])
        del self._buffer[:size]
        return taken

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        start = 0
        while (found := self._buffer.find(separator, start)) < 0:
            if len(self._buffer) > limit:
                raise UpstreamBroken("head too large")
            start = max(0, len(self._buffer) - len(separator) + 1)
            await self._more(limit)
        return self._take(found + len(separator))

    def take_buffered(self, size: int) -> bytes | None:
        """`size` bytes if they have arrived already, else None (then `read_exactly`)."""
        return self._take(size) if len(self._buffer) >= size else None

    async def read_exactly(self, size: int) -> bytes:
        """`size` bytes, at most READ_PAUSE_BYTES: reading resumes only while the buffer holds
        less than is asked, so a larger size would buffer whatever the upstream sends."""
        while len(self._buffer) < size:
            await self._more(size)
        return self._take(size)

    async def read_some(self, most: int) -> bytes:
        """Up to `most` bytes; b"" only at the end of the stream."""
        while not self._buffer:
            if self._eof:
                return b""
            await self._more(1)
        return self._take(most)

    # --- the pool's view -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self._outbox.write(self.transport, data)

    def usable(self) -> bool:
        """An idle connection the upstream closed (or sent stray bytes on) is not reused."""
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and not self._eof
            and not self._buffer
        )

    def close(self) -> None:
        if self.transport is not None:
            self._outbox.flush(self.transport)
            self.transport.close()


class ConnectionPool:
    """At most `max_connections` open at once; idle ones are reused, newest first."""

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int,
        connect_timeout: float,
        exchange_timeout: float,
        outbox: Outbox,
    ):
        self._host, self._port = host, port
        self._outbox = outbox
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._exchange_timeout = exchange_timeout
        self._idle: deque[UpstreamConnection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_use: set[UpstreamConnection] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def _sweep(self) -> None:
        """Expires exchanges past their deadline: one timer for the pool instead of one per
        request (a timer handle to create and cancel, on the hot path)."""
        interval = min(0.05, self._exchange_timeout / 10)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for connection in [c for c in self._in_use if c.deadline <= now]:
                connection.expire()

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
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
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
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self._outbox), self._host, self._port
                )
        except (OSError, TimeoutError):
            self._open -= 1
            self._wake()
            raise UpstreamUnreachable from None
        return connection

    def release(self, connection: UpstreamConnection, reusable: bool) -> None:
        self._in_use.discard(connection)
        connection.deadline = math.inf
        if reusable and connection.usable():
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
