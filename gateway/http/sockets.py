"""Listening sockets, bound exclusively: a second gateway on a busy address fails to start
instead of silently sharing the port (SO_REUSEPORT would let a `monitor` gateway started by
mistake answer half of a `required` one's traffic). Workers share the one socket their
supervisor bound, inherited as a file descriptor."""

from __future__ import annotations

import os
import socket
from typing import Final

LISTEN_FD_ENV: Final = "GATEWAY_LISTEN_FD"  # a worker's inherited public socket


class StartupError(Exception):
    """The gateway cannot start; the message is one line naming what failed."""


def bind(address: str) -> socket.socket:
    """A non-blocking listening TCP socket on `HOST:PORT` (IPv6 hosts in brackets)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Only lets a restarted gateway bind while old connections sit in TIME_WAIT; on Linux
        # it never lets two sockets listen on one address.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def inherited_listener() -> socket.socket | None:
    """The listening socket a supervisor handed this worker, if any."""
    fd = os.environ.get(LISTEN_FD_ENV)
    if fd is None:
        return None
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return sock
