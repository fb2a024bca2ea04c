"""One client connection: requests parsed as they arrive, answered one at a time and in order.

What a connection holds is bounded by the limits, never by the client: a connection whose
transport is past its high-water mark (a client not reading its answers) stops reading and
answers nothing more until the transport drains, and the listener cuts it once its output has
been stuck for the idle timeout. Pipelined heads wait in a short queue; past it, reading pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol, cast

import httptools

from gateway.http import framing
from gateway.http.errors import VersionUnsupported
from gateway.http.handler import Handler
from gateway.http.messages import BodyState, Request, Response
from gateway.http.outbox import Outbox
from gateway.http.output import Output
from gateway.http.parsing import RequestReader
from gateway.http.relay import relay

MAX_QUEUED: Final = 16  # pipelined heads waiting for an answer before the connection stops reading
# After the last answer, how long what the client still sends is dropped.
LINGER_SECONDS: Final = 2.0


class Listener(Protocol):
    """What a connection needs of the listener that accepted it."""

    handler: Handler
    loop: asyncio.AbstractEventLoop
    outbox: Outbox

    def admit(self, connection: HttpConnection) -> bool:
        """Counts the connection in; False past the limit (then it is closed at once)."""
        ...

    def release(self, connection: HttpConnection) -> None: ...


@dataclass(frozen=True, slots=True)
class _Unparsable:
    """Where the parser gave up: answered 400 in its turn, then the connection closes."""

    error: str  # the exception's type, for the log; never the bytes that caused it
    version_unsupported: bool


class HttpConnection(asyncio.Protocol):
    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._handler = listener.handler
        self._loop = listener.loop
        self._output = Output(listener.loop, listener.outbox)
        self._transport: asyncio.Transport | None = None
        self._reader: RequestReader | None = None
        self._remote: str | None = None
        self._queue: deque[Request | _Unparsable] = deque()  # waiting for an answer, in order
        self._serving = False
        # One task per connection, waiting on `_arrival` between requests: waking it costs
        # less than a new task per request. (The loop holds tasks weakly: kept here.)
        self._serving_task: asyncio.Task[None] | None = None
        self._arrival: asyncio.Future[None] | None = None
        self._reading = True  # False once no further request on this connection is parsed
        self._upgraded = False  # the client asked to switch protocols: answered, then closed
        self._lingering: asyncio.TimerHandle | None = None
        self.idle_since: float | None = self._loop.time()  # None while a request is answered

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self._transport = self._output.transport = cast(asyncio.Transport, transport)
        if not self._listener.admit(self):
            self._output.closed = True  # nothing is read; connection_lost has nothing to undo
            self._transport.close()
            return
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        limits = self._handler.limits
        self._reader = RequestReader(
            self,
            self._remote,
            field_limit=limits.max_field_bytes,
            body_limit=limits.max_body_bytes,
            arrived=self._arrived,
            last=self._stop_reading,
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self._reading or self._reader is None:
            return  # lingering, or past a request that closes the connection: dropped
        try:
            self._reader.feed(data)
        except httptools.HttpParserUpgrade:
            # The request before the switch is answered; nothing after it is read as HTTP.
            self._upgraded = True
            self._reading = False
        except httptools.HttpParserError as exc:
            exc.__traceback__ = None  # its frames would hold this connection in a cycle
            cause = exc.__context__ or exc
            self._unparsable(
                _Unparsable(type(cause).__name__, isinstance(cause, VersionUnsupported))
            )

    def eof_received(self) -> bool:
        if self._reader is not None:
            self._reader.abandon()
        self._reading = False
        if self._lingering is not None or not (self._serving or self._queue):
            self.close()
            return False
        return True  # the answers under way are still written; then the connection closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reader is None:
            return  # never admitted
        self._output.lost()
        self._reading = False
        self._reader.abandon()
        if self._lingering is not None:
            self._lingering.cancel()
        self._wake_server()  # it sees the connection closed and ends
        self._listener.release(self)

    def pause_writing(self) -> None:
        # The client is not taking its answers: read no more requests from it until it does
        # (while lingering, what it sends is only dropped).
        self._output.stalled()
        if self._transport is not None and self._lingering is None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._output.resumed()
        self._resume_reading()

    # --- what the reader hands over ------------------------------------------------------------

    def _arrived(self, request: Request) -> None:
        self._queue.append(request)
        self.idle_since = None
        if not self._serving:
            self._wake_server()
        elif len(self._queue) >= MAX_QUEUED and self._transport is not None:
            self._transport.pause_reading()

    def _stop_reading(self) -> None:
        self._reading = False

    def _unparsable(self, unparsable: _Unparsable) -> None:
        self._reading = False
        if self._reader is not None and self._reader.abandon():
            return  # its body broke: that request's answer is the 400
        self._queue.append(unparsable)
        if not self._serving:
            self._wake_server()

    # --- answering -----------------------------------------------------------------------------

    def _wake_server(self) -> None:
        """Something was queued, or the connection closed: the serving task looks again (a new
        one if there is none, or if it ended, say on an error that escaped it)."""
        if self._serving_task is None or self._serving_task.done():
            if not self._output.closed:
                self._serving = True
                self._serving_task = self._loop.create_task(self._serve())
            return
        arrival, self._arrival = self._arrival, None
        if arrival is not None and not arrival.done():
            self._serving = True
            arrival.set_result(None)

    async def _serve(self) -> None:
        """Answers what is queued, in order, then waits for more; ends with the connection.
        (One coroutine for the connection's life: a coroutine more per request shows.)"""
        output = self._output
        while not output.closed:
            try:
                while self._queue and not output.closed:
                    if output.stalled_since is not None:
                        await output.drain()  # no further answer before the client takes these
                        continue
                    item = self._queue[0]
                    if isinstance(item, _Unparsable):
                        return self._refuse_unparsable(item)
                    try:
                        response = await self._handler.handle(item)
                    except Exception:
                        response = self._handler.failed()
                        response.close = True
                    self._queue.popleft()
                    keep_alive = self._keep_alive(item, response)
                    if response.stream is None:
                        output.write(framing.buffered_answer(item, response, keep_alive))
                    else:
                        keep_alive = await relay(
                            output, item, response, response.stream, keep_alive
                        )
                    if not keep_alive:
                        return self._finish()
                    self._resume_reading()
            finally:
                self._serving = False
            if not self._reading:
                if not output.closed:
                    self._finish()  # the client half-closed, or the last request asked to close
                return
            self.idle_since = self._loop.time()
            self._arrival = self._loop.create_future()
            await self._arrival

    def _refuse_unparsable(self, unparsable: _Unparsable) -> None:
        response = self._handler.unparsable(
            self._remote, unparsable.error, version_unsupported=unparsable.version_unsupported
        )
        self._output.write(framing.buffered_answer(None, response, keep_alive=False))
        self._finish()

    def _resume_reading(self) -> None:
        """Reads again, unless the queue is full or the client is not taking its answers."""
        if (
            self._transport is not None
            and self._output.stalled_since is None
            and len(self._queue) < MAX_QUEUED
        ):
            self._transport.resume_reading()

    def _keep_alive(self, request: Request, response: Response) -> bool:
        """Whether the connection stays open for another request after this answer."""
        return (
            not response.close
            and self._keeps_alive(request)
            and request.body_state is BodyState.COMPLETE
        )

    def _keeps_alive(self, request: Request) -> bool:
        return request.keep_alive and not self._handler.stopping and not self._upgraded

    # --- the Channel a request sees ------------------------------------------------------------

    def send_continue(self) -> None:
        self._output.write(framing.CONTINUE)

    # --- writing and closing -------------------------------------------------------------------

    def _finish(self) -> None:
        """No more answers on this connection: send FIN, drop what the client still sends for
        a moment (closing with unread data would reset the connection and could destroy the
        answer in flight), then close."""
        self._reading = False
        if self._output.closed or self._transport is None or self._lingering is not None:
            return
        self.idle_since = None
        self._lingering = self._loop.call_later(LINGER_SECONDS, self.close)
        self._transport.resume_reading()  # what the client still sends is read, and dropped
        self._output.flush()
        if self._transport.can_write_eof():
            self._transport.write_eof()

    def abort(self) -> None:
        self._output.abort()

    def close(self) -> None:
        self._output.close()

    @property
    def stalled_since(self) -> float | None:
        """Since when the client has taken none of its output (the listener cuts it after the
        idle timeout), None while it takes it."""
        return self._output.stalled_since

    @property
    def idle(self) -> bool:
        return not self._serving and not self._queue
