"""A lean HTTP/1.1 client for the upstream: one write per request on a pooled connection, the
answer read by llhttp (`response_reader.py`), its body in bounded pieces.

aiohttp's general-purpose client costs about a third of the gateway's CPU per request (request
objects, a writer task, cookie and redirect machinery we never use). This one does only what a
reverse proxy needs, and refuses any answer it could read two ways as a broken upstream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from gateway.http.answer_rest import PIECE_BYTES, rest_of_answer
from gateway.http.pool import ConnectionPool
from gateway.http.response_reader import Head
from gateway.http.upstream_connection import encode_request


@dataclass(slots=True)
class Answer:
    head: Head
    body: bytes  # the whole body, or its first `buffer` bytes when `rest` is set
    rest: AsyncGenerator[bytes, None] | None

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(self, head: Head, body: bytes, rest: AsyncGenerator[bytes, None] | None) -> None:
        self.head = head
        self.body = body
        self.rest = rest

    @property
    def status(self) -> int:
        return self.head.status


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
            connection.send(method, encode_request(method, target, self._host, header_lines, body))
            head = await connection.head()
            if head.bodyless:
                self._pool.release(connection)
                return Answer(head, b"", None)
            whole = connection.whole_body()  # the usual small answer: no generator
            if whole is not None and len(whole) <= self._buffer:
                self._pool.release(connection)
                return Answer(head, whole, None)
            buffered = bytearray(whole or b"")
            while len(buffered) < self._buffer:
                piece = await connection.read_some(PIECE_BYTES)
                if not piece:
                    self._pool.release(connection)
                    return Answer(head, bytes(buffered), None)
                buffered += piece
        except BaseException:
            self._pool.release(connection)  # not whole: closed, never reused
            raise
        return Answer(head, bytes(buffered), rest_of_answer(self._pool, connection))
