"""One request as the pipeline reads it, and the answer it gives back.

The connection (`connection.py`) fills a `Request` as the parser reads it: the head at
once, the body as it arrives. The pipeline reads headers by name, waits for the body only when
it did not come with the head, and returns a `Response` for the connection to write.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from enum import Enum
from typing import Final, Protocol

from gateway.base.clock import system_time
from gateway.base.memo import BoundedMemo
from gateway.http.errors import BodyBroken, BodyTimeout, BodyTooLarge

_REQUEST_ID_PREFIX: Final = os.urandom(6).hex()  # per process: ids stay unique across workers
_request_numbers: Final = itertools.count()


def new_request_id() -> str:
    # 12 hex digits of the count, wrapping after 2**48 requests. to_bytes().hex() rather than
    # an f-string's `:012x`, which the compiled build formats in three times the time.
    return _REQUEST_ID_PREFIX + (next(_request_numbers) & 0xFFFF_FFFF_FFFF).to_bytes(6).hex()


_date_line: Final[list[tuple[int, bytes]]] = [(-1, b"")]  # formatted once a second


def date_line() -> bytes:
    """The `Date` header line for an answer the gateway writes itself."""
    second = int(system_time())
    cached_second, line = _date_line[0]
    if second != cached_second:
        line = b"Date: " + formatdate(second, usegmt=True).encode()
        _date_line[0] = (second, line)
    return line


def normalise_header_name(name: str) -> str:
    """A header's name as the gateway reads it: lower case, `_` read as `-` (CGI-style servers
    read X_Auth_Status as X-Auth-Status, so the gateway must too)."""
    return name.lower().replace("_", "-")


_header_keys: Final[BoundedMemo[bytes, str]] = BoundedMemo(4096)


def header_key(raw_name: bytes) -> str:
    """`normalise_header_name` of a received name, each distinct one computed once."""
    key = _header_keys.get(raw_name)
    if key is None:
        key = _header_keys.keep(raw_name, normalise_header_name(raw_name.decode("latin-1")))
    return key


def header_lines(headers: Iterable[tuple[str, str]]) -> list[bytes]:
    return [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in headers]


class Channel(Protocol):
    """What a request may ask of the connection it came on before its answer is ready."""

    def send_continue(self) -> None: ...


class BodyState(Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    TOO_LARGE = "too_large"  # past the limit: the rest is read and dropped
    BROKEN = "broken"  # bad framing, or the client went away mid-body


class Request:
    __slots__ = (
        "_chunks",
        "_keys",
        "_limit",
        "_size",
        "_waiter",
        "body_state",
        "channel",
        "content_length",
        "expects_continue",
        "keep_alive",
        "method",
        "raw_headers",
        "raw_path",
        "remote",
        "version",
    )

    def __init__(
        self,
        channel: Channel,
        method: str,
        raw_path: str,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        remote: str | None,
        *,
        keep_alive: bool,
        content_length: int | None,
        expects_continue: bool,
        body_limit: int,
    ) -> None:
        self.channel = channel
        self.method = method
        self.raw_path = raw_path  # the request target as sent, path and query
        self.version = version  # "1.1" or "1.0"
        self.raw_headers = raw_headers  # (name, value) as received, in order
        self.remote = remote
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.expects_continue = expects_continue
        self.body_state = BodyState.RECEIVING
        self._limit = body_limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._keys: list[str] | None = None

    # --- headers -------------------------------------------------------------------------------

    def header_keys(self) -> list[str]:
        """Each received header's `header_key`, in the order of `raw_headers`."""
        keys = self._keys
        if keys is None:
            known = _header_keys.get
            keys = self._keys = [known(name) or header_key(name) for name, _ in self.raw_headers]
        return keys

    # One compiled loop over the keys rather than `in` then `index`: on a list, both are a
    # generic comparison per element, twice.
    def header(self, key: str) -> str | None:
        """The first value of a header, by its `header_key`."""
        for index, name in enumerate(self.header_keys()):
            if name == key:
                return self.raw_headers[index][1].decode("utf-8", "surrogateescape")
        return None

    def header_values(self, key: str) -> list[str]:
        values: list[str] = []
        for index, name in enumerate(self.header_keys()):
            if name == key:
                values.append(self.raw_headers[index][1].decode("utf-8", "surrogateescape"))
        return values

    # --- the body, as the connection receives it -----------------------------------------------

    def receive(self, chunk: bytes) -> None:
        if self.body_state is not BodyState.RECEIVING:
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self._chunks.clear()
            self._end(BodyState.TOO_LARGE)
        else:
            self._chunks.append(chunk)

    def complete(self) -> None:
        if self.body_state is BodyState.RECEIVING:
            self._end(BodyState.COMPLETE)

    def broken(self) -> None:
        if self.body_state is BodyState.RECEIVING:
            self._chunks.clear()
            self._end(BodyState.BROKEN)

    def _end(self, state: BodyState) -> None:
        self.body_state = state
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the body, as the pipeline reads it ----------------------------------------------------

    def complete_body(self) -> bytes | None:
        """The body, when it came whole with the head and no `100 Continue` is owed; else None
        (then `body` waits for it)."""
        if self.body_state is not BodyState.COMPLETE or self.expects_continue:
            return None
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def body(self, within_seconds: float) -> bytes:
        """The whole body; `BodyTooLarge` past the limit, `BodyTimeout` when it has not come
        within `within_seconds`, `BodyBroken` for bad framing or a client gone mid-body."""
        if self.expects_continue:  # sent even when the body came early: the client asked
            self.expects_continue = False
            self.channel.send_continue()
        if self.body_state is BodyState.RECEIVING:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(within_seconds):
                    await self._waiter
            except TimeoutError:
                self.broken()
                raise BodyTimeout from None
        if self.body_state is BodyState.COMPLETE:
            chunks = self._chunks
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.body_state is BodyState.TOO_LARGE:
            raise BodyTooLarge
        raise BodyBroken


def _unobserved(error: BaseException | None) -> None:
    pass


@dataclass(slots=True)
class Streamed:
    """The rest of an answer's body, relayed as it arrives. The connection writes it (chunked
    for HTTP/1.1), cuts the connection with a reset if `pieces` raises or the client takes
    nothing for `within_seconds`, closes `pieces` in every case, then calls `finished` with
    what `pieces` raised (None when it ended, or when the client was cut)."""

    pieces: AsyncGenerator[bytes, None]
    within_seconds: float
    finished: Callable[[BaseException | None], None] = _unobserved


@dataclass(slots=True)
class Response:
    status: int
    headers: list[bytes]  # "Name: value" lines; the connection adds the framing ones
    body: bytes  # the whole body, or its first part when `stream` is set
    close: bool  # the connection closes after this answer
    stream: Streamed | None

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(
        self,
        status: int,
        headers: list[bytes],
        body: bytes = b"",
        *,
        close: bool = False,
        stream: Streamed | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.close = close
        self.stream = stream
