"""The public listener: HTTP/1.1 connections parsed by llhttp (through httptools), answered one
request at a time and in order, each answer written in one piece.

What a connection holds is bounded by the limits, never by the client: a connection whose
transport is past its high-water mark (a client not reading its answers) stops reading and
answers nothing more until the transport drains, and is cut once its output has been stuck for
`idle_timeout_seconds`. Past `max_client_connections` a new connection is closed at once.

aiohttp's server builds a request object, a payload stream, a response object and a writer for
every request: a quarter of the gateway's CPU per request more than this. A reverse proxy with a
buffered body needs much less: the head, the body, one write. llhttp runs in strict mode:
conflicting `Content-Length`s, a length next to chunked framing, obs-fold, bare CR and invalid
bytes are refused before any of the pipeline runs, with the contract's JSON 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from gateway.base.tasks import spawn
from gateway.config.settings import LimitsSettings
from gateway.http.messages import (
    BodyState,
    Request,
    Response,
    date_line,
    header_lines,
    new_request_id,
)
from gateway.http.outbox import Outbox
from gateway.refusals.answers import render_error
from gateway.refusals.reasons import Reason
from gateway.telemetry.metrics import Metrics, Tally

log = logging.getLogger("gateway.server")

MAX_HEADERS = 128
MAX_QUEUED = 16  # pipelined heads waiting for an answer before the connection stops reading
LINGER_SECONDS = 2.0  # after the last answer, how long what the client still sends is dropped
# Written answers wait in the outbox until the end of the loop's pass, where the transport
# cannot see them: past this much (the transport's default high-water mark) they are handed to
# it at once, so that it can say whether to pause.
UNSENT_BYTES = 64 * 1024
ACCEPT_BATCH = 128  # connections accepted per wake-up of the listening socket
ACCEPT_RETRY_SECONDS = 0.1  # after a failed accept (out of descriptors): the backlog waits
LOG_INTERVAL_SECONDS = 1.0  # refused connections are each counted, but logged at most this often
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, zero seconds: close sends RST
_NO_BODY = frozenset({204, 304})
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}".encode() for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown" % status


class Handler(Protocol):
    stopping: bool  # refuse new requests with 503 and close each connection after its answer

    @property
    def limits(self) -> LimitsSettings: ...

    async def handle(self, request: Request) -> Response: ...

    def protocol_error(
        self, remote: str | None, reason: Reason, request_id: str, status: int
    ) -> None: ...


class _HeadTooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Unparsable:
    """Where the parser gave up: answered 400 in its turn, then the connection closes."""

    error: str  # the exception's type, for the log; never the bytes that caused it


class HttpConnection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._handler = server.handler
        limits = server.handler.limits
        self._field_limit = max(8190, limits.max_token_bytes + 1024)
        self._body_limit = limits.max_body_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._loop = server.loop
        self._outbox = server.outbox
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        # the head being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_length: int | None = None
        self._expects_continue = False
        self._receiving: Request | None = None  # head complete, body still arriving
        self._queue: deque[Request | _Unparsable] = deque()  # waiting for an answer, in order
        self._serving = False
        # One task per connection, waiting on `_arrival` between requests: waking it costs
        # less than a new task per request. (The loop holds tasks weakly: kept here.)
        self._serving_task: asyncio.Task[None] | None = None
        self._arrival: asyncio.Future[None] | None = None
        self._reading = True  # False once no further request on this connection is parsed
        self._upgraded = False  # the client asked to switch protocols: answered, then closed
        self._closed = False
        self._lingering: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes written since this connection last flushed its outbox
        self._drained: asyncio.Future[None] | None = None
        self.idle_since: float | None = self._loop.time()  # None while a request is answered
        # Since when the transport has been past its high-water mark, None while it takes writes.
        self.stalled_since: float | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        if len(server.connections) >= self._handler.limits.max_client_connections:
            self._closed = True  # nothing is read, and connection_lost has nothing to undo
            self._transport.close()
            server.refused_past_limit()
            return
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.connections.add(self)
        server.counted()

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            return  # lingering, or past a request that closes the connection: dropped
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request before the switch is answered; nothing after it is read as HTTP.
            self._upgraded = True
            self._reading = False
        except httptools.HttpParserError as exc:
            exc.__traceback__ = None  # its frames would hold this connection in a cycle
            self._unparsable(type(exc.__context__ or exc).__name__)

    def eof_received(self) -> bool:
        if self._receiving is not None:
            self._receiving.broken()
            self._receiving = None
        self._reading = False
        if self._lingering is not None or not (self._serving or self._queue):
            self.close()
            return False
        return True  # the answers under way are still written; then the connection closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._reading = False
        if self._receiving is not None:
            self._receiving.broken()
            self._receiving = None
        if self._lingering is not None:
            self._lingering.cancel()
        self._wake_writer()
        self._wake_server()  # it sees the connection closed and ends
        self._server.connections.discard(self)
        self._server.counted()

    def pause_writing(self) -> None:
        # The client is not taking its answers: read no more requests from it until it does
        # (while lingering, what it sends is only dropped).
        self.stalled_since = self._loop.time()
        if self._transport is not None and self._lingering is None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self.stalled_since = None
        self._wake_writer()
        self._resume_reading()

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._content_length = None
        self._expects_continue = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._field_limit:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._receiving is not None:
            return  # a chunked body's trailer fields: never read as headers
        if (
            len(name) > self._field_limit
            or len(value) > self._field_limit
            or len(self._headers) >= MAX_HEADERS
        ):
            raise _HeadTooLarge
        # llhttp drops the whitespace before a value but keeps what trails it; RFC 9110 reads
        # neither, and so does every upstream: one reading here too.
        value = value.rstrip(b" \t")
        self._headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self._content_length = int(value)  # llhttp checked it is digits, and only one
        elif len(name) == 6 and name.lower() == b"expect":
            self._expects_continue = value.strip().lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        request = Request(
            self,
            parser.get_method().decode("ascii"),
            self._url.decode("utf-8", "surrogateescape"),
            version,
            self._headers,
            self._remote,
            keep_alive=parser.should_keep_alive(),
            content_length=self._content_length,
            expects_continue=self._expects_continue and version == "1.1",
            body_limit=self._body_limit,
        )
        self._receiving = request
        self._queue.append(request)
        self.idle_since = None
        if not self._serving:
            self._wake_server()
        elif len(self._queue) >= MAX_QUEUED and self._transport is not None:
            self._transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._receiving is not None:
            self._receiving.receive(body)

    def on_message_complete(self) -> None:
        request, self._receiving = self._receiving, None
        if request is not None:
            request.complete()
            if not request.keep_alive:
                self._reading = False

    # --- answering -----------------------------------------------------------------------------

    def _wake_server(self) -> None:
        """Something was queued, or the connection closed: the serving task looks again (a new
        one if there is none, or if it ended, say on an error that escaped it)."""
        if self._serving_task is None or self._serving_task.done():
            if not self._closed:
                self._serving = True
                self._serving_task = self._loop.create_task(self._serve())
            return
        arrival, self._arrival = self._arrival, None
        if arrival is not None and not arrival.done():
            self._serving = True
            arrival.set_result(None)

    async def _serve(self) -> None:
        """Answers what is queued, in order, then waits for more; ends with the connection."""
        while not self._closed:
            try:
                while self._queue and not self._closed:
                    if self.stalled_since is not None:
                        await self._drain()  # no further answer before the client takes these
                        continue
                    item = self._queue[0]
                    if isinstance(item, _Unparsable):
                        self._refuse_unparsable(item)
                        return
                    try:
                        response = await self._handler.handle(item)
                    except Exception:
                        response = self._internal_error()
                    self._queue.popleft()
                    if not self._respond(item, response):
                        self._finish()
                        return
                    self._resume_reading()
            finally:
                self._serving = False
            if not self._reading:
                if not self._closed:
                    self._finish()  # the client half-closed, or the last request asked to close
                return
            self.idle_since = self._loop.time()
            self._arrival = self._loop.create_future()
            await self._arrival

    def _resume_reading(self) -> None:
        """Reads again, unless the queue is full or the client is not taking its answers."""
        if (
            self._transport is not None
            and self.stalled_since is None
            and len(self._queue) < MAX_QUEUED
        ):
            self._transport.resume_reading()

    async def _drain(self, deadline: float | None = None) -> bool:
        """Waits until the transport takes writes again or the connection is lost; False when
        `deadline` (loop time) comes first."""
        self._drained = drained = self._loop.create_future()
        if deadline is None:
            await drained
            return True
        try:
            async with asyncio.timeout_at(deadline):
                await drained
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _internal_error() -> Response:
        request_id = new_request_id()
        log.exception(
            "request failed inside the gateway", extra={"fields": {"request_id": request_id}}
        )
        answer = render_error(Reason.INTERNAL, request_id)
        headers = header_lines([*answer.headers.items(), ("X-Request-Id", request_id)])
        headers.append(date_line())
        return Response(answer.status, headers, answer.body, close=True)

    def _respond(self, request: Request, response: Response) -> bool:
        """Writes the answer; whether the connection stays open for another request."""
        keep_alive = (
            not response.close
            and self._keeps_alive(request)
            and request.body_state is BodyState.COMPLETE
        )
        if response.streamed:
            return keep_alive
        status, body = response.status, response.body
        lines = [_status_line(status), *response.headers]
        # A HEAD answer's length would be the GET's, which is not known here: left out.
        if status not in _NO_BODY and request.method != "HEAD":
            lines.append(b"Content-Length: %d" % len(body))
        if not keep_alive:
            lines.append(b"Connection: close")
        elif request.version == "1.0":
            lines.append(b"Connection: keep-alive")
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        if request.method == "HEAD" or status in _NO_BODY:
            self.write(head)
        else:
            self.write(head + body)
        return keep_alive

    def _keeps_alive(self, request: Request) -> bool:
        return request.keep_alive and not self._handler.stopping and not self._upgraded

    def _refuse_unparsable(self, unparsable: _Unparsable) -> None:
        request_id = new_request_id()
        log.info(
            "unparsable request",
            extra={"fields": {"request_id": request_id, "error": unparsable.error}},
        )
        answer = render_error(Reason.HTTP_MALFORMED, request_id)
        lines = [
            _status_line(answer.status),
            *header_lines([*answer.headers.items(), ("X-Request-Id", request_id)]),
            date_line(),
            b"Content-Length: %d" % len(answer.body),
            b"Connection: close",
            b"\r\n",
        ]
        self.write(b"\r\n".join(lines) + answer.body)
        self._handler.protocol_error(self._remote, Reason.HTTP_MALFORMED, request_id, answer.status)
        self._finish()

    def _unparsable(self, error: str) -> None:
        self._reading = False
        if self._receiving is not None:  # its body broke: that request's answer is the 400
            self._receiving.broken()
            self._receiving = None
            return
        self._queue.append(_Unparsable(error))
        if not self._serving:
            self._wake_server()

    # --- the Channel a request sees ------------------------------------------------------------

    def send_continue(self) -> None:
        self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def stream(
        self, response: Response, rest: AsyncIterator[bytes], within_seconds: float
    ) -> None:
        """Writes an answer whose body is still arriving from the upstream: chunked for HTTP/1.1,
        delimited by closing the connection for HTTP/1.0. Exceptions from `rest` propagate.

        A client that stops taking the answer is cut once `within_seconds` have passed: what
        `rest` holds (an upstream connection) is not held for it without end."""
        deadline = self._loop.time() + within_seconds
        request = self._queue[0]
        assert isinstance(request, Request)
        chunked = request.version == "1.1"
        lines = [_status_line(response.status), *response.headers]
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
        if not chunked or not self._keeps_alive(request):
            lines.append(b"Connection: close")
            response.close = True
        lines.append(b"\r\n")
        response.streamed = True
        head = b"\r\n".join(lines)
        self.write(
            head + (b"%x\r\n%b\r\n" % (len(response.body), response.body) if chunked else b"")
        )
        if not chunked:
            self.write(response.body)
        async for piece in rest:
            if self._closed:
                response.close = True
                return
            self.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            if self._transport is not None:
                # Sent now, not after the pass: the transport says whether to pause only once
                # it holds the bytes, and meanwhile the upstream's buffer (up to 4 MiB) would
                # be poured into the client's.
                self._outbox.flush(self._transport)
            if self.stalled_since is not None and not await self._drain(deadline):
                response.close = True
                self.abort()
                return
        if chunked:
            self.write(b"0\r\n\r\n")

    def abort(self) -> None:
        """Cut the connection with a reset: an answer broken midway must never look complete
        (a FIN would end an HTTP/1.0 body as if whole), and what a client that reads nothing
        was sent must not stay queued in the kernel behind a FIN it never takes."""
        if self._transport is not None:
            sock = self._transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            self._transport.abort()

    # --- writing and closing -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._outbox.write(self._transport, data)
            self._unsent += len(data)
            if self._unsent > UNSENT_BYTES:
                # Counted since the last flush of ours, not the outbox's end of pass: at worst
                # one answer in UNSENT_BYTES is sent a pass early.
                self._unsent = 0
                self._outbox.flush(self._transport)

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _finish(self) -> None:
        """No more answers on this connection: send FIN, drop what the client still sends for
        a moment (closing with unread data would reset the connection and could destroy the
        answer in flight), then close."""
        self._reading = False
        if self._closed or self._transport is None or self._lingering is not None:
            return
        self.idle_since = None
        self._lingering = self._loop.call_later(LINGER_SECONDS, self.close)
        self._transport.resume_reading()  # what the client still sends is read, and dropped
        self._outbox.flush(self._transport)
        if self._transport.can_write_eof():
            self._transport.write_eof()

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._outbox.flush(self._transport)
            self._transport.close()

    @property
    def idle(self) -> bool:
        return not self._serving and not self._queue


def _error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


class _Refusals:
    """Connections refused for one reason: every one counted, logged at most once a second (a
    flood of them must not flood the log as well); `count` says how many since the last line."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tally: Tally, message: str) -> None:
        self._loop = loop
        self._tally = tally
        self._message = message
        self._unlogged = 0
        self._next_log = -math.inf

    def note(self, **fields: object) -> None:
        self._tally.inc()
        self._unlogged += 1
        now = self._loop.time()
        if now >= self._next_log:
            self._next_log = now + LOG_INTERVAL_SECONDS
            log.warning(self._message, extra={"fields": {**fields, "count": self._unlogged}})
            self._unlogged = 0


class HttpServer:
    """The listening socket, its connections, and the timer that closes idle and stalled ones."""

    def __init__(
        self,
        handler: Handler,
        loop: asyncio.AbstractEventLoop,
        outbox: Outbox,
        metrics: Metrics,
    ) -> None:
        self.handler = handler
        self.loop = loop
        self.outbox = outbox
        self.connections: set[HttpConnection] = set()
        self._metrics = metrics
        self._listener: socket.socket | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        refused = metrics.connections_refused_by
        self._past_limit = _Refusals(loop, refused["limit"], "client connection refused")
        self._accept_failed = _Refusals(
            loop, refused["accept_error"], "accepting a connection failed"
        )

    async def start(self, sock: socket.socket) -> None:
        # Accepted here rather than by `loop.create_server`: uvloop (libuv) meets EMFILE by
        # accepting and resetting the waiting connections without a word; here each failure is
        # counted and logged, and the backlog waits for descriptors to free up.
        self._listener = sock
        self._listen()
        self._sweeper = self.loop.create_task(self._sweep())

    def _listen(self) -> None:
        self._retry = None
        assert self._listener is not None
        self.loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue  # the client left before it was accepted
            except OSError as exc:
                # Out of descriptors or memory: the listening socket stays readable, so
                # accepting pauses for a moment instead of spinning the loop.
                self._accept_failed.note(error=_error_name(exc))
                self.loop.remove_reader(listener.fileno())
                self._retry = self.loop.call_later(ACCEPT_RETRY_SECONDS, self._listen)
                return
            spawn(self._adopt(sock))

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: HttpConnection(self), sock)
        except OSError as exc:
            sock.close()
            self._accept_failed.note(error=_error_name(exc))

    def refused_past_limit(self) -> None:
        limit = self.handler.limits.max_client_connections
        self._past_limit.note(reason="limit", max_client_connections=limit)

    def counted(self) -> None:
        """`connections` changed: the gauge follows."""
        self._metrics.open_client_connections = len(self.connections)

    async def _sweep(self) -> None:
        """Closes connections without a complete request head for `idle_timeout_seconds` (idle
        keep-alive and slow heads alike), and cuts those whose client has taken none of their
        output for as long. One timer for all of them, not one per request."""
        while True:
            timeout = self.handler.limits.idle_timeout_seconds
            await asyncio.sleep(min(1.0, timeout / 4))
            horizon = self.loop.time() - timeout
            for connection in list(self.connections):
                stalled, idle = connection.stalled_since, connection.idle_since
                if stalled is not None and stalled < horizon:
                    connection.abort()  # closing would wait for the client to read first
                elif idle is not None and idle < horizon:
                    connection.close()

    async def close(self, grace_seconds: float) -> None:
        """Stops accepting, closes idle connections at once, gives the others `grace_seconds`
        to finish their answers, then cuts them."""
        if self._listener is not None:
            if self._retry is not None:
                self._retry.cancel()
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = self.loop.time() + grace_seconds
        while self.connections:
            for connection in list(self.connections):
                if connection.idle:
                    connection.close()
            if self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()
