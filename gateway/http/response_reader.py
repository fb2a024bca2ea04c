"""Upstream answers as llhttp (httptools' response parser) reads them: one reading or none.

llhttp refuses what it could read two ways: malformed status lines and chunk sizes, control
bytes in field values, obs-fold, `Content-Length` twice or beside `Transfer-Encoding`. On top
of it: only HTTP/1.0 and 1.1, a three-digit status from 100, no protocol switch, a head within
`MAX_HEAD_BYTES`, and no transfer coding but a single `chunked` (a coding the gateway would
relay undeclared is refused, not passed on). Anything refused is a broken upstream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

import httptools

from gateway.base.memo import BoundedMemo
from gateway.http.errors import UpstreamBroken

MAX_HEAD_BYTES: Final = 64 * 1024
MAX_FIELDS: Final = 128

# Hop-by-hop (RFC 9110 §7.6.1) and framing fields: they describe this connection, not the answer.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)


@dataclass(frozen=True, slots=True, eq=False)  # shared by every answer with the same head
class Head:
    """A final answer's head. `lines` are its end-to-end fields ("Name: value" as received):
    hop-by-hop and framing fields, and those its `Connection` names, are left out."""

    status: int
    lines: tuple[bytes, ...]
    names: frozenset[bytes]  # the lower-case names of `lines`
    length: int | None  # the declared Content-Length
    chunked: bool
    bodyless: bool  # 204, 304, or the answer to HEAD

    @property
    def until_close(self) -> bool:
        """The body ends when the upstream closes the connection."""
        return not self.bodyless and self.length is None and not self.chunked


class ResponseReader:
    """Feeds a connection's bytes to llhttp, one exchange at a time (`begin`), and keeps what
    they said: the final answer's `head`, the `pieces` of its body not yet taken, whether it
    has `ended` and the connection may carry another (`keep_alive`). Interim (1xx) answers are
    read past.

    llhttp validates the head; its fields are then read from the head's own bytes, once per
    distinct head (an upstream sends the same few again and again), rather than through a
    Python callback per field."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = False
        self._interims = 0  # interim answers read past in this exchange
        self._earlier: list[bytes] = []  # segments of this exchange before the one being fed
        self._current = b""  # the segment being fed
        self.head: Head | None = None
        self.pieces: deque[bytes] = deque()
        self.held = 0  # bytes in `pieces`
        self.ended = True  # until `begin`, any byte is one nobody asked for
        self.keep_alive = False

    def begin(self, method: str) -> None:
        """The next exchange's answer, to a request with `method`, is what comes next."""
        if self._head_request:
            # llhttp still waits for the body the answer to HEAD declared: a parser afresh.
            self._parser = httptools.HttpResponseParser(self)
        self._head_request = method == "HEAD"
        self._interims = 0
        self._earlier = []
        self.head = None
        self.ended = self.keep_alive = False

    def end_at_close(self) -> bool:
        """The upstream closed the connection: the end of a body that lasts until then.
        Whether that made the answer whole."""
        head = self.head
        if head is not None and head.until_close and not self.ended:
            self.ended = True
        return self.ended

    def take(self, most: int) -> bytes:
        """Up to `most` bytes of the body that has arrived (b"" when none has)."""
        if not self.pieces:
            return b""
        piece = self.pieces.popleft()
        if len(piece) > most:
            piece, rest = piece[:most], piece[most:]
            self.pieces.appendleft(rest)
        self.held -= len(piece)
        return piece

    def feed(self, data: bytes) -> None:
        """Raises `UpstreamBroken` for anything but one well-formed answer (and bytes after
        it: nothing was asked for them)."""
        self._current = data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise UpstreamBroken("protocol switch") from None  # never asked for
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback of ours raised, if it was one
            if isinstance(cause, UpstreamBroken):
                raise cause from None
            raise UpstreamBroken(str(exc)) from None
        if self.head is None:  # the head goes on in the next segment
            self._earlier.append(data)
            if sum(map(len, self._earlier)) > MAX_HEAD_BYTES * (self._interims + 1):
                raise UpstreamBroken("head too large")

    # --- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.ended:
            raise UpstreamBroken("bytes after the answer")

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if not 100 <= status <= 999:
            raise UpstreamBroken("status code")
        if status < 200:
            self._check_version()
            self._interims += 1  # 100 Continue, 103 Early Hints (101 never gets here)
            return
        raw = self._raw_head()
        if self._head_request:
            self._check_version()
            self.head = _head(status, _fields(raw), head_request=True)
            # llhttp cannot be told that an answer to HEAD has no body: it ends here, and
            # whatever llhttp would read as its body is a byte after the answer.
            self.ended, self.keep_alive = True, parser.should_keep_alive()
            return
        # The status line, version and all, is part of the head's bytes: a head found among
        # those seen passed the version check when it was kept (httptools formats the
        # version into a new string on every call).
        head = _heads.get(raw)
        if head is None:
            self._check_version()
            head = _heads.keep(raw, _head(status, _fields(raw)))
        self.head = head

    def _check_version(self) -> None:
        if self._parser.get_http_version() not in ("1.1", "1.0"):
            raise UpstreamBroken("HTTP version")

    def on_body(self, body: bytes) -> None:
        if self.ended:
            raise UpstreamBroken("bytes after the answer")
        if self.head is not None:
            self.pieces.append(body)
            self.held += len(body)

    def on_message_complete(self) -> None:
        if self.head is not None and not self.ended:
            self.ended, self.keep_alive = True, self._parser.should_keep_alive()

    def _raw_head(self) -> bytes:
        """The final answer's head as it came, past any interim answers (heads alone)."""
        received = b"".join((*self._earlier, self._current)) if self._earlier else self._current
        end = -4
        for _ in range(self._interims + 1):
            end = received.find(b"\r\n\r\n", end + 4)
        start = received.rfind(b"\r\n\r\n", 0, end) + 4 if self._interims else 0
        if end - start > MAX_HEAD_BYTES:
            raise UpstreamBroken("head too large")
        return received[start : end + 4]


def _fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The field lines of a head llhttp accepted (a token, a colon, a value without CR, LF or
    other control bytes): each name and its value without the whitespace around it."""
    lines = raw[:-4].split(b"\r\n")[1:]
    if len(lines) > MAX_FIELDS:
        raise UpstreamBroken("too many header fields")
    fields = []
    for line in lines:
        name, _, value = line.partition(b":")
        fields.append((name, value.strip(b" \t")))
    return fields


# Heads seen, by their bytes: only `Date` changes, once a second.
_heads: Final[BoundedMemo[bytes, Head]] = BoundedMemo(512)


def _head(status: int, fields: list[tuple[bytes, bytes]], head_request: bool = False) -> Head:
    length: int | None = None
    chunked = False
    connection: list[bytes] = []
    names: list[bytes] = []
    lines: list[bytes] = []
    for name, value in fields:
        folded = name.lower()
        if folded not in _HOP_BY_HOP:
            names.append(folded)
            lines.append(name + b": " + value)
        elif folded == b"content-length":
            length = int(value)  # llhttp checked it is digits, and only one
        elif folded == b"transfer-encoding":
            if chunked or value.strip().lower() != b"chunked":
                raise UpstreamBroken("transfer coding")
            chunked = True
        elif folded == b"connection":
            connection.append(value)
    named = _connection_named(connection) if connection else None
    if named:
        kept = [i for i, n in enumerate(names) if n.replace(b"_", b"-") not in named]
        names, lines = [names[i] for i in kept], [lines[i] for i in kept]
    bodyless = head_request or status in (204, 304)
    return Head(status, tuple(lines), frozenset(names), length, chunked, bodyless)


_named_memo: Final[dict[tuple[bytes, ...], frozenset[bytes]]] = {}


def _connection_named(values: list[bytes]) -> frozenset[bytes]:
    """The end-to-end fields `Connection` names besides its own options, as `_`-free names;
    the usual `Connection: keep-alive` names none."""
    key = tuple(values)
    named = _named_memo.get(key)
    if named is None:
        tokens = {t.strip().lower().replace(b"_", b"-") for v in values for t in v.split(b",")}
        named = frozenset(tokens - {b"keep-alive", b"close"})
        if len(_named_memo) > 256:
            _named_memo.clear()
        _named_memo[key] = named
    return named
