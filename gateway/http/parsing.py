"""Request heads and bodies as llhttp (through httptools) reads them, in strict mode.

Conflicting `Content-Length`s, a length next to chunked framing, obs-fold, bare CR and invalid
bytes are refused by the parser itself; this module adds the limits on what one head may hold
and hands each request to its connection as soon as its head is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import httptools

from gateway.http.errors import HostInvalid, ObsoleteVersion, VersionUnsupported
from gateway.http.messages import Channel, Request

MAX_HEADERS: Final = 128


class HeadTooLarge(Exception):
    """A target, a header name or value past the field limit, or too many headers."""


class RequestReader:
    """Feeds llhttp and turns its callbacks into `Request`s: `arrived` gets each one once its
    head is complete, and its body follows into it as it comes."""

    def __init__(
        self,
        channel: Channel,
        remote: str | None,
        *,
        field_limit: int,
        body_limit: int,
        arrived: Callable[[Request], None],
        last: Callable[[], None],
    ) -> None:
        self._channel = channel
        self._remote = remote
        self._field_limit = field_limit
        self._body_limit = body_limit
        self._arrived = arrived
        self._last = last  # the request just read asked to close the connection after it
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_length: int | None = None
        self._expects_continue = False
        self._hosts = 0
        self.receiving: Request | None = None  # head complete, body still arriving

    def feed(self, data: bytes) -> None:
        """Raises httptools' `HttpParserUpgrade` and `HttpParserError` as they come."""
        self._parser.feed_data(data)

    def abandon(self) -> bool:
        """No more of the body under way will come: that request's body is broken. Whether
        there was one."""
        request, self.receiving = self.receiving, None
        if request is None:
            return False
        request.broken()
        return True

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._content_length = None
        self._expects_continue = False
        self._hosts = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._field_limit:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.receiving is not None:
            return  # a chunked body's trailer fields: never read as headers
        if (
            len(name) > self._field_limit
            or len(value) > self._field_limit
            or len(self._headers) >= MAX_HEADERS
        ):
            raise HeadTooLarge
        # llhttp drops the whitespace before a value but keeps what trails it; RFC 9110 reads
        # neither, and so does every upstream: one reading here too. (The last byte looked at
        # first, SP or HTAB: compiled comparisons instead of a method call on every header.)
        if value and value[-1] in (0x20, 0x09):
            value = value.rstrip(b" \t")
        self._headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self._content_length = int(value)  # llhttp checked it is digits, and only one
        elif len(name) == 6 and name.lower() == b"expect":
            self._expects_continue = value.strip().lower() == b"100-continue"
        elif len(name) == 4 and name.lower() == b"host":
            self._hosts += 1

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ObsoleteVersion if version == "0.9" else VersionUnsupported
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            raise HostInvalid
        request = Request(
            self._channel,
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
        self.receiving = request
        self._arrived(request)

    def on_body(self, body: bytes) -> None:
        if self.receiving is not None:
            self.receiving.receive(body)

    def on_message_complete(self) -> None:
        request, self.receiving = self.receiving, None
        if request is not None:
            request.complete()
            if not request.keep_alive:
                self._last()
