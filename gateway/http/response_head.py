"""An upstream answer's head, read strictly: one reading or none.

Field lines as RFC 9112 allows them, no obs-fold, one `Content-Length` or chunked framing but
never both; anything else is a broken upstream. Hop-by-hop fields, and those `Connection`
names, describe the connection and are not relayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.base.memo import BoundedMemo
from gateway.http.errors import UpstreamBroken

_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Framing:
    """How the body ends: a length, chunks, the connection closing, or no body at all."""

    kind: str  # "length" | "chunked" | "close" | "none"
    length: int = 0


# Hop-by-hop (RFC 9110 §7.6.1) and framing fields: they describe this connection, not the answer.
_HOP_BY_HOP = frozenset(
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


@dataclass(frozen=True, slots=True, eq=False)
class Head:
    """A parsed response head. `lines` are its end-to-end fields ("Name: value" as received):
    hop-by-hop and framing fields, and those its `Connection` names, are left out."""

    status: int
    lines: tuple[bytes, ...]
    names: frozenset[bytes]  # the lower-case names of `lines`
    framing: Framing
    keep_alive: bool


# Field lines as RFC 9112 allows them: a token, a colon, a value without CR or LF. Anything else
# (obs-fold, a space before the colon, a bare CR or LF that would split our answer) is refused.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FIELD_LINES = re.compile(rb"(?:" + _TOKEN + rb":[^\r\n]*\r\n)*")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([^\r\n]*?)[ \t]*\r\n")

# An upstream sends the same few heads again and again (only `Date` changes, once a second):
# each distinct head is parsed once. Parsing depends on nothing but the bytes (HEAD answers,
# whose framing depends on the method, are not kept).
_parsed_heads: BoundedMemo[bytes, Head] = BoundedMemo(512)


def parse_head(head: bytes, method: str) -> Head:
    if method == "HEAD":
        return _parse_head(head, method)
    parsed = _parsed_heads.get(head)
    return parsed if parsed is not None else _parsed_heads.keep(head, _parse_head(head, method))


def _parse_head(head: bytes, method: str) -> Head:
    status_line, _, fields = head[:-2].partition(b"\r\n")
    version, status = _status(status_line)
    if not _FIELD_LINES.fullmatch(fields):
        raise UpstreamBroken("header line")
    fields_read = _Fields(keep_alive=version == b"HTTP/1.1")
    for name, value in _FIELD.findall(fields):
        fields_read.add(name, value)
    lines, names = fields_read.end_to_end()
    keep_alive = fields_read.keep_alive
    if method == "HEAD" or status in _NO_BODY_STATUSES or 100 <= status < 200:
        return Head(status, lines, names, Framing("none"), keep_alive)
    framing = fields_read.framing()
    return Head(status, lines, names, framing, keep_alive and framing.kind != "close")


def _status(status_line: bytes) -> tuple[bytes, int]:
    version, _, rest = status_line.partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit() or len(code) != 3:
        raise UpstreamBroken("status line")
    status = int(code)
    if status == 101:
        raise UpstreamBroken("protocol switch")  # never asked for: nothing after it is HTTP
    return version, status


class _Fields:
    """A head's fields as they are read: the framing ones apart, the rest kept as received."""

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.received: list[tuple[bytes, bytes]] = []
        self.lengths: set[bytes] = set()
        self.codings: list[bytes] = []
        self.connection_named: set[bytes] = set()

    def add(self, name: bytes, value: bytes) -> None:
        folded = name.lower()
        if folded == b"content-length":
            self.lengths.add(value)
        elif folded == b"transfer-encoding":
            self.codings += [c.strip().lower() for c in value.split(b",")]
        elif folded == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            self.keep_alive = b"close" not in tokens and (
                self.keep_alive or b"keep-alive" in tokens
            )
            self.connection_named |= {t.replace(b"_", b"-") for t in tokens}
        self.received.append((folded, name + b": " + value))

    def end_to_end(self) -> tuple[tuple[bytes, ...], frozenset[bytes]]:
        """The lines that describe the answer, not this connection, and their names."""
        kept = [
            (n, line)
            for n, line in self.received
            if n not in _HOP_BY_HOP and n.replace(b"_", b"-") not in self.connection_named
        ]
        return tuple(line for _, line in kept), frozenset(n for n, _ in kept)

    def framing(self) -> Framing:
        """How the body ends; an answer with two readings is a broken upstream."""
        lengths, codings = self.lengths, self.codings
        if codings:
            if lengths:
                raise UpstreamBroken("Content-Length with Transfer-Encoding")
            if codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
                return Framing("chunked")
            return Framing("close")
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            raise UpstreamBroken("Content-Length")
        if lengths:
            return Framing("length", int(next(iter(lengths))))
        return Framing("close")
