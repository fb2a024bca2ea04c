"""A lean HTTP/1.1 client for the one upstream: one write per request on a pooled connection,
a strict response parser (`response_head.py`), bodies read in bounded pieces.

aiohttp's general-purpose client costs about a third of the gateway's CPU per request (request
objects, a writer task, cookie and redirect machinery we never use). This one does only what a
reverse proxy needs, and refuses any response it could read two ways (obs-fold, conflicting
Content-Length, a length next to chunked framing, malformed chunks) as a broken upstream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from gateway.http.errors import UpstreamBroken
from gateway.http.pool import ConnectionPool, UpstreamConnection
from gateway.http.response_head import Framing, Head, parse_head

MAX_HEAD_BYTES = 64 * 1024
PIECE_BYTES = 64 * 1024  # the most of a body read (and relayed) at once, whatever was declared


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


async def _chunks(reader: UpstreamConnection) -> AsyncIterator[bytes]:
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


async def _body(reader: UpstreamConnection, framing: Framing) -> AsyncIterator[bytes]:
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
        connection: UpstreamConnection,
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
