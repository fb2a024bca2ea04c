"""A lean HTTP/1.1 client for the one upstream: a keep-alive pool, one write per request, a
strict response parser.

aiohttp's general-purpose client costs about a third of the gateway's CPU per request (request
objects, a writer task, cookie and redirect machinery we never use). This one does only what a
reverse proxy needs, and refuses any response it could read two ways (obs-fold, conflicting
Content-Length, a length next to chunked framing, malformed chunks) as a broken upstream.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

from gateway.base.memo import BoundedMemo
from gateway.http.errors import UpstreamBroken, UpstreamUnreachable
from gateway.http.outbox import Outbox

MAX_HEAD_BYTES = 64 * 1024
PIECE_BYTES = 64 * 1024  # the most of a body read (and relayed) at once, whatever was declared
_NO_BODY_STATUSES = frozenset({204, 304})


class _Connection(asyncio.Protocol):
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
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._in_use: set[_Connection] = set()
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

    async def exchange(self) -> _Connection:
        """A connection for one exchange, whose reads fail with TimeoutError once the exchange
        has taken `exchange_timeout`; hand it back with `release`."""
        return self.exchange_idle() or self._begin(await self._acquire())

    def exchange_idle(self) -> _Connection | None:
        """`exchange` without waiting: an idle connection, or None when there is none."""
        connection = self._take_idle()
        return None if connection is None else self._begin(connection)

    def _begin(self, connection: _Connection) -> _Connection:
        connection.deadline = connection.time() + self._exchange_timeout
        self._in_use.add(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return connection

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable():
                return connection
            self._discard(connection)
        return None

    async def _acquire(self) -> _Connection:
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
                    lambda: _Connection(self._outbox), self._host, self._port
                )
        except (OSError, TimeoutError):
            self._open -= 1
            self._wake()
            raise UpstreamUnreachable from None
        return connection

    def release(self, connection: _Connection, reusable: bool) -> None:
        self._in_use.discard(connection)
        connection.deadline = math.inf
        if reusable and connection.usable():
            self._idle.append(connection)
            self._wake()
        else:
            self._discard(connection)

    def _discard(self, connection: _Connection) -> None:
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


@dataclass(frozen=True, slots=True)
class Framing:
    """How the body ends: a length, chunks, the connection closing, or no body at all."""

    kind: str  # "length" | "chunked" | "close" | "none"
    length: int = 0


# Hop-by-hop (RFC 9110 §7.6.1) and framing fields: they describe this connection, not the answer.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


@dataclass(frozen=True, slots=True, eq=False)
class Head:
    """A parsed response head. `lines` are its end-to-end fields ("Name: value" as received):
    hop-by-hop and framing fields, and those its `Connection` names, are left out."""

    status: int
    lines: tuple[bytes, ...]
    names: frozenset[bytes]  # the lower-case names of `lines`
    framing: Framing
    keep_alive: bool


@dataclass(slots=True)
class Answer:
    head: Head
    body: bytes  # the whole body, or its first `buffer` bytes when `rest` is set
    rest: AsyncGenerator[bytes, None] | None

    @property
    def status(self) -> int:
        return self.head.status


def encode_request(
    method: str, target: str, host: str, header_lines: list[bytes], body: bytes
) -> bytes:
    """The request head, `header_lines` ("Name: value") as given, then the body."""
    start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode()
    if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
        end = b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    else:
        end = b"\r\n\r\n"
    return b"".join((start, b"\r\n".join(header_lines), end, body))


# Field lines as RFC 9112 allows them: a token, a colon, a value without CR or LF. Anything else
# (obs-fold, a space before the colon, a bare CR or LF that would split our answer) is refused.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELD_LINES = re.compile(rb"(?:" + _TOKEN + rb":[^\r\n]*\r\n)*")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n]*?)[ \t]*\r\n")

# An upstream sends the same few heads again and again (only `Date` changes, once a second):
# each distinct head is parsed once. Parsing depends on nothing but the bytes (HEAD answers,
# whose framing depends on the method, are not kept).
_parsed_heads: BoundedMemo[bytes, Head] = BoundedMemo(512)


def parse_head(head: bytes, method: str) -> Head:
    if method == "HEAD":
        return _parse_head(head, method)
    parsed = _parsed_heads.get(head)
    return parsed if parsed is not None else _parsed_heads.keep(head, _parse_head(head, method))


def _parse_head(head: bytes, method: str) -> Head:
    status_line, _, fields = head[:-2].partition(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3:
        raise UpstreamBroken("status line")
    if not _FIELD_LINES.fullmatch(fields):
        raise UpstreamBroken("header line")
    status = int(code)
    if status == 101:
        raise UpstreamBroken("protocol switch")  # never asked for: nothing after it is HTTP
    received: list[tuple[bytes, bytes]] = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    connection_named: set[bytes] = set()
    keep_alive = version == b"HTTP/1.1"
    for name, value in _FIELD.findall(fields):
        folded = name.lower()
        if folded == b"content-length":
            lengths.add(value)
        elif folded == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
        elif folded == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            keep_alive = b"close" not in tokens and (keep_alive or b"keep-alive" in tokens)
            connection_named |= {t.replace(b"_", b"-") for t in tokens}
        received.append((folded, name + b": " + value))
    kept = [
        (n, line)
        for n, line in received
        if n not in _HOP_BY_HOP and n.replace(b"_", b"-") not in connection_named
    ]
    lines = tuple(line for _, line in kept)
    names = frozenset(n for n, _ in kept)
    if method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
        return Head(status, lines, names, Framing("none"), keep_alive)
    if codings:
        if lengths:
            raise UpstreamBroken("Content-Length with Transfer-Encoding")
        if codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
            return Head(status, lines, names, Framing("chunked"), keep_alive)
        return Head(status, lines, names, Framing("close"), False)
    if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
        raise UpstreamBroken("Content-Length")
    if lengths:
        return Head(status, lines, names, Framing("length", int(next(iter(lengths)))), keep_alive)
    return Head(status, lines, names, Framing("close"), False)


async def _chunks(reader: _Connection) -> AsyncIterator[bytes]:
    while True:
        size_line = await reader.read_until(b"\r\n", MAX_HEAD_BYTES)
        size_text = size_line[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise UpstreamBroken("chunk size") from None
        if size_text[:1] in (b"+", b"-") or size < 0:
            raise UpstreamBroken("chunk size")
        if size == 0:
            while await reader.read_until(b"\r\n", MAX_HEAD_BYTES) != b"\r\n":  # trailers, dropped
                pass
            return
        # In pieces: a declared size is only a promise, and holding a chunk whole would let
        # the upstream fill memory with one (the read buffer stops at READ_PAUSE_BYTES).
        while size:
            piece = await reader.read_some(min(size, PIECE_BYTES))
            if not piece:
                raise UpstreamBroken("chunk shorter than its size")
            size -= len(piece)
            yield piece
        if await reader.read_exactly(2) != b"\r\n":
            raise UpstreamBroken("chunk end")


async def _body(reader: _Connection, framing: Framing) -> AsyncIterator[bytes]:
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            piece = await reader.read_some(min(remaining, PIECE_BYTES))
            if not piece:
                raise UpstreamBroken("body shorter than Content-Length")
            remaining -= len(piece)
            yield piece
    elif framing.kind == "chunked":
        async for piece in _chunks(reader):
            yield piece
    elif framing.kind == "close":
        while piece := await reader.read_some(PIECE_BYTES):
            yield piece


class Client:
    """Sends one request on a pooled connection; `buffer` bytes of the answer are read before
    it returns, so a break inside them is a 502 rather than a truncated 2xx."""

    def __init__(self, pool: ConnectionPool, host_header: str, buffer: int):
        self._pool = pool
        self._host = host_header
        self._buffer = buffer

    async def request(
        self, method: str, target: str, header_lines: list[bytes], body: bytes
    ) -> Answer:
        connection = self._pool.exchange_idle() or await self._pool.exchange()
        try:
            connection.write(encode_request(method, target, self._host, header_lines, body))
            while True:
                head = parse_head(await connection.read_until(b"\r\n\r\n", MAX_HEAD_BYTES), method)
                if head.status >= 200:
                    break  # an interim 1xx answer is read past
            framing, keep_alive = head.framing, head.keep_alive
            if framing.kind == "none" or (
                framing.kind == "length" and framing.length <= self._buffer
            ):
                # The usual small answer: one read, no generator.
                whole = connection.take_buffered(framing.length)
                if whole is None:
                    whole = await connection.read_exactly(framing.length)
                self._pool.release(connection, reusable=keep_alive)
                return Answer(head, whole, None)
            pieces = _body(connection, framing)
            buffered = bytearray()
            complete = True
            async for piece in pieces:
                buffered += piece
                if len(buffered) >= self._buffer:
                    complete = False
                    break
        except BaseException:
            self._pool.release(connection, reusable=False)
            raise
        if complete:
            self._pool.release(connection, reusable=keep_alive)
            return Answer(head, bytes(buffered), None)
        rest = self._rest(connection, pieces, keep_alive)
        return Answer(head, bytes(buffered), rest)

    async def _rest(
        self,
        connection: _Connection,
        pieces: AsyncIterator[bytes],
        keep_alive: bool,
    ) -> AsyncGenerator[bytes, None]:
        """The answer past the buffer, still under the exchange's deadline."""
        reusable = False
        try:
            async for piece in pieces:
                yield piece
            reusable = keep_alive
        finally:
            self._pool.release(connection, reusable=reusable)
