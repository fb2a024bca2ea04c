"""The part of an upstream answer past what the client buffers, read as it is relayed.

An async generator, which mypyc does not compile: kept out of `client.py` so that the request
itself is compiled."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from gateway.http.pool import ConnectionPool
from gateway.http.upstream_connection import UpstreamConnection

PIECE_BYTES = 64 * 1024  # the most of a body read (and relayed) at once, whatever was declared


async def rest_of_answer(
    pool: ConnectionPool, connection: UpstreamConnection
) -> AsyncGenerator[bytes, None]:
    """The answer past the buffer, still under the exchange's deadline."""
    try:
        while piece := await connection.read_some(PIECE_BYTES):
            yield piece
    finally:
        pool.release(connection)
