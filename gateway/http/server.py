"""The public listener: accepts connections within a limit, and closes the idle and the stuck.

aiohttp's server builds a request object, a payload stream, a response object and a writer for
every request: a quarter of the gateway's CPU per request more than this. A reverse proxy with a
buffered body needs much less: the head, the body, one write (`connection.py`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import ssl
from typing import Final

from gateway.base.tasks import spawn
from gateway.http.connection import HttpConnection
from gateway.http.handler import ConnectionCounts, Handler
from gateway.http.outbox import Outbox

log: Final = logging.getLogger("gateway.server")

ACCEPT_BATCH: Final = 128  # connections accepted per wake-up of the listening socket
ACCEPT_RETRY_SECONDS: Final = 0.1  # after a failed accept (out of descriptors): the backlog waits
# Refused connections are each counted, but logged at most this often.
LOG_INTERVAL_SECONDS: Final = 1.0
HANDSHAKE_SECONDS: Final = 10.0  # a TLS handshake not done by then is dropped


def _error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


class _Refusals:
    """Connections refused for one reason: every one counted, logged at most once a second (a
    flood of them must not flood the log as well); `count` says how many since the last line."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        counts: ConnectionCounts,
        reason: str,
        message: str,
    ) -> None:
        self._loop = loop
        self._counts = counts
        self._reason = reason
        self._message = message
        self._unlogged = 0
        self._next_log = -math.inf

    def note(self, **fields: object) -> None:
        self._counts.connection_refused(self._reason)
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
        counts: ConnectionCounts,
    ) -> None:
        self.handler = handler
        self.loop = loop
        self.outbox = outbox
        self.connections: set[HttpConnection] = set()
        # HTTPS when set; may be replaced (a reload with new certificates): the next handshakes
        # use the new one.
        self.tls: ssl.SSLContext | None = None
        # Accepted, TLS handshake under way: not yet a connection, but holding a descriptor.
        self._handshaking: set[HttpConnection] = set()
        self._counts = counts
        self._listener: socket.socket | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._past_limit = _Refusals(loop, counts, "limit", "client connection refused")
        self._accept_failed = _Refusals(
            loop, counts, "accept_error", "accepting a connection failed"
        )
        self._handshake_failed = _Refusals(loop, counts, "tls_handshake", "TLS handshake failed")

    async def start(self, sock: socket.socket, tls: ssl.SSLContext | None = None) -> None:
        # Accepted here rather than by `loop.create_server`: uvloop (libuv) meets EMFILE by
        # accepting and resetting the waiting connections without a word; here each failure is
        # counted and logged, and the backlog waits for descriptors to free up.
        self._listener = sock
        self.tls = tls
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
            limit = self.handler.limits.max_connections
            if len(self.connections) + len(self._handshaking) >= limit:
                sock.close()  # handshakes count too: each holds a descriptor and a buffer
                self._past_limit.note(reason="limit", max_client_connections=limit)
                continue
            spawn(self._adopt(sock))

    async def _adopt(self, sock: socket.socket) -> None:
        tls = self.tls
        created: list[HttpConnection] = []

        def connection() -> HttpConnection:
            # Made before the handshake; counted as a connection once `admit`ted after it.
            created.append(made := HttpConnection(self))
            self._handshaking.add(made)
            return made

        try:
            await self.loop.connect_accepted_socket(
                connection,
                sock,
                ssl=tls,
                ssl_handshake_timeout=HANDSHAKE_SECONDS if tls else None,
            )
        except (ssl.SSLError, TimeoutError, ConnectionError) as exc:
            sock.close()
            if tls is None:
                self._accept_failed.note(error=type(exc).__name__)
            else:  # a client that is not speaking TLS, or not finishing its handshake
                self._handshake_failed.note(error=type(exc).__name__)
        except OSError as exc:
            sock.close()
            self._accept_failed.note(error=_error_name(exc))
        finally:
            self._handshaking.difference_update(created)

    def admit(self, connection: HttpConnection) -> bool:
        self._handshaking.discard(connection)
        limit = self.handler.limits.max_connections
        if len(self.connections) >= limit:
            self._past_limit.note(reason="limit", max_client_connections=limit)
            return False
        self.connections.add(connection)
        self._counts.connections_open(len(self.connections))
        return True

    def release(self, connection: HttpConnection) -> None:
        self.connections.discard(connection)
        self._counts.connections_open(len(self.connections))

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
