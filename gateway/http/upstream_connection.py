"""One connection to the upstream: the request written in one piece, the answer read by llhttp
as it arrives, its body handed on in pieces the reader takes.

What the connection holds of a body is bounded whatever the upstream declares: reading pauses
while more than `READ_PAUSE_BYTES` wait to be taken. Bytes that arrive outside an exchange
(an answer nobody asked for) make the connection unusable at once: they would otherwise be
read as the answer to the next request.
"""

from __future__ import annotations

import asyncio
import math
from typing import cast

from gateway.http.errors import UpstreamBroken
from gateway.http.outbox import Outbox
from gateway.http.response_reader import Head, ResponseReader


def encode_request(
    method: str, target: str, host: str, header_lines: list[bytes], body: bytes
) -> bytes:
    """What `UpstreamConnection.send` writes: the request head, `header_lines` ("Name:
    value") as given, then the body."""
    start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode()
    if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
        end = b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    else:
        end = b"\r\n\r\n"
    return b"".join((start, b"\r\n".join(header_lines), end, body))


class UpstreamConnection(asyncio.Protocol):
    READ_PAUSE_BYTES = 4 << 20  # stop reading from the socket past this much not yet taken

    def __init__(self, outbox: Outbox) -> None:
        self.transport: asyncio.Transport | None = None
        self._outbox = outbox
        self._loop = asyncio.get_running_loop()  # asked once: each call costs a getpid()
        self._reader = ResponseReader()
        self._exchanging = False
        self._spoiled = False  # bytes came after the answer: it stands, the connection goes
        self._failure: BaseException | None = None
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.deadline = math.inf  # loop time; the pool's sweeper expires reads past it
        self.idle_since = 0.0  # loop time it was last handed back

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        if not self._exchanging or self._failure is not None:
            self._fail(UpstreamBroken("bytes outside an exchange"))
            return
        try:
            reader.feed(data)
        except UpstreamBroken as exc:
            if not reader.ended:
                self._fail(exc)
                return
            self._spoiled = True
        if reader.held > self.READ_PAUSE_BYTES and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._closed_by_upstream()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_by_upstream()

    def _closed_by_upstream(self) -> None:
        self._eof = True
        if self._exchanging:
            self._reader.end_at_close()
        self._wake()

    def _fail(self, failure: BaseException) -> None:
        """Nothing more on this connection is believed: the exchange under way (if any) raises
        `failure`, and the connection is never reused."""
        if self._failure is None:
            self._failure = failure
        if not self._exchanging and self.transport is not None:
            self.transport.close()  # idle in the pool: closed now rather than when next taken
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the exchange --------------------------------------------------------------------------

    def send(self, method: str, request: bytes) -> None:
        """Starts an exchange: the request goes out, its answer will be read."""
        self._reader.begin(method)
        self._exchanging = True
        assert self.transport is not None
        self._outbox.write(self.transport, request)

    def expire(self) -> None:
        """The exchange outlived its deadline: the read under way, and any later one, raise
        TimeoutError."""
        self.deadline = math.inf
        self._fail(TimeoutError())

    def time(self) -> float:
        return self._loop.time()

    def _more(self) -> asyncio.Future[None]:
        """What to await for more (a future, not a coroutine: one object less per wait)."""
        if self._failure is not None:
            raise self._failure
        if self._eof:
            raise UpstreamBroken("closed before the answer's end")
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = waiter = self._loop.create_future()
        return waiter

    async def head(self) -> Head:
        while self._reader.head is None:
            await self._more()
        return self._reader.head

    def whole_body(self) -> bytes | None:
        """The whole body if it has all arrived (the usual small answer), else None."""
        reader = self._reader
        if not reader.ended or self._failure is not None:
            return None
        pieces = reader.pieces
        body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        reader.held = 0
        return body

    async def read_some(self, most: int) -> bytes:
        """Up to `most` bytes of the body; b"" at its end."""
        reader = self._reader
        while not reader.pieces:
            if reader.ended and self._failure is None:
                return b""
            await self._more()
        return reader.take(most)

    # --- the pool's view -----------------------------------------------------------------------

    def finished(self) -> bool:
        """The exchange ended with an answer read whole on a connection fit for another one."""
        reader = self._reader
        whole = reader.ended and reader.keep_alive and not reader.pieces
        self._exchanging = False
        return whole and not self._spoiled and self._failure is None

    def usable(self) -> bool:
        """An idle connection the upstream closed, or sent anything on, is not reused."""
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and not self._eof
            and self._failure is None
        )

    def close(self) -> None:
        if self.transport is not None:
            self._outbox.flush(self.transport)
            self.transport.close()
