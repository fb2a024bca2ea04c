"""How an answer goes on the wire: its status line, the framing fields the connection adds, and
the chunks of an answer relayed as it arrives."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from gateway.http.messages import Request, Response

NO_BODY_STATUSES: Final = frozenset({204, 304})
_STATUS_LINES: Final = {s.value: f"HTTP/1.1 {s.value} {s.phrase}".encode() for s in HTTPStatus}
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown" % status


def buffered_answer(request: Request | None, response: Response, keep_alive: bool) -> bytes:
    """A whole answer: head and body. `request` is None for an answer to bytes that never
    became one (its method unknown, so the body is sent)."""
    status, body = response.status, response.body
    method = request.method if request is not None else None
    bodyless = status in NO_BODY_STATUSES or method == "HEAD"
    lines = [status_line(status), *response.headers]
    # A HEAD answer's length would be the GET's, which is not known here: left out.
    if not bodyless:
        lines.append(b"Content-Length: %d" % len(body))
    if not keep_alive:
        lines.append(b"Connection: close")
    elif request is not None and request.version == "1.0":
        lines.append(b"Connection: keep-alive")
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    return head if bodyless else head + body


def streamed_head(response: Response, chunked: bool, keep_alive: bool) -> bytes:
    """The head of an answer whose body is still arriving, and the part already here: chunked
    for HTTP/1.1, delimited by closing the connection for HTTP/1.0."""
    lines = [status_line(response.status), *response.headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    if not keep_alive:
        lines.append(b"Connection: close")
    lines.append(b"\r\n")
    head = b"\r\n".join(lines)
    if chunked:
        return head + chunk(response.body) if response.body else head
    return head + response.body


def chunk(piece: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(piece), piece)
