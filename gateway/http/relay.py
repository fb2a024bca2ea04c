"""An answer whose body is still arriving from the upstream, relayed as it comes: chunked for
HTTP/1.1, delimited by closing the connection for HTTP/1.0.

A truncated answer must never look complete, so a relay that breaks midway cuts the connection
with a reset; and a client that stops taking the answer is cut once the relay's time is up, so
what the pieces hold (an upstream connection) is not held for it without end.
"""

from __future__ import annotations

from typing import Protocol

from gateway.http import framing
from gateway.http.messages import Request, Response, Streamed


class Writable(Protocol):
    """The connection, as a relay writes to it."""

    stalled_since: float | None  # the client has not been taking its output since then

    @property
    def closed(self) -> bool: ...

    def time(self) -> float: ...

    def write(self, data: bytes) -> None: ...

    def send_now(self, data: bytes) -> None: ...

    async def drain(self, deadline: float) -> bool: ...

    def abort(self) -> None: ...


async def relay(
    connection: Writable, request: Request, response: Response, streamed: Streamed, keep_alive: bool
) -> bool:
    """Writes the answer; whether the connection stays open. `streamed.pieces` is closed and
    `streamed.finished` told what it raised, whatever happens."""
    chunked = request.version == "1.1"
    keep_alive = keep_alive and chunked
    error: BaseException | None = None
    try:
        connection.write(framing.streamed_head(response, chunked, keep_alive))
        if not await _pieces(connection, streamed, chunked):
            return False
    except Exception as exc:  # from the pieces: the upstream broke, or took too long
        error = exc
        connection.abort()
        return False
    finally:
        await streamed.pieces.aclose()  # hands the upstream connection back, or closes it
        streamed.finished(error)
    if chunked:
        connection.write(framing.LAST_CHUNK)
    return keep_alive


async def _pieces(connection: Writable, streamed: Streamed, chunked: bool) -> bool:
    """The pieces as they come; False when the connection was lost or cut meanwhile."""
    deadline = connection.time() + streamed.within_seconds
    async for piece in streamed.pieces:
        if connection.closed:
            return False
        # Sent now, not after the loop's pass: the transport says whether to pause only once
        # it holds the bytes, and meanwhile the upstream's buffer (up to 4 MiB) would be
        # poured into the client's.
        connection.send_now(framing.chunk(piece) if chunked else piece)
        if connection.stalled_since is not None and not await connection.drain(deadline):
            connection.abort()
            return False
    return True
