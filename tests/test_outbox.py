"""Writes gathered per pass of the event loop (gateway/http/outbox.py), over real loopback sockets:
order per connection, nothing sent before the pass ends, flush before a half-close, and one
transport that refuses a write never holding back another's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.http.outbox import Outbox


@dataclass
class Pair:
    transport: asyncio.Transport  # the side the outbox writes to
    peer: socket.socket  # the other end, non-blocking

    def ready(self) -> bytes | None:
        """What the peer's socket holds right now, without waiting (None: nothing yet)."""
        try:
            return self.peer.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    async def received(self, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        async with asyncio.timeout(5):
            while len(data) < size:
                piece = await loop.sock_recv(self.peer, size - len(data))
                if not piece:
                    break
                data += piece
        return data


class _Sink(asyncio.Protocol):
    pass


@contextlib.asynccontextmanager
async def pairs(count: int) -> AsyncIterator[list[Pair]]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    made: list[Pair] = []
    try:
        for _ in range(count):
            transport, _ = await loop.create_connection(
                _Sink, "127.0.0.1", listener.getsockname()[1]
            )
            peer, _ = listener.accept()  # already queued: the connect completed
            peer.setblocking(False)
            made.append(Pair(transport, peer))
        yield made
    finally:
        for pair in made:
            pair.transport.close()
            pair.peer.close()
        listener.close()


async def test_each_connection_gets_its_writes_in_order_once_the_pass_ends() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with pairs(2) as (a, b):
        for piece in (b"a1", b"b1", b"a2", b"a3", b"b2"):
            outbox.write(a.transport if piece[:1] == b"a" else b.transport, piece)
        # Loopback delivers inside write(): an immediate write would be in the peer's socket.
        assert a.ready() is None
        assert b.ready() is None
        assert await a.received(6) == b"a1a2a3"
        assert await b.received(4) == b"b1b2"


async def test_flush_sends_what_is_queued_at_once_before_a_half_close() -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with pairs(1) as (pair,):
        outbox.write(pair.transport, b"last ")
        outbox.write(pair.transport, b"answer")
        outbox.flush(pair.transport)
        assert pair.ready() == b"last answer"
        pair.transport.write_eof()
        assert await pair.received(1) == b""  # EOF, nothing after it


async def test_an_aborted_connection_drops_its_queued_writes_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with pairs(2) as (gone, alive):
        outbox.write(gone.transport, b"never sent")
        outbox.write(alive.transport, b"sent")
        gone.transport.abort()
        assert await alive.received(4) == b"sent"
        assert await gone.received(1) == b""  # closed, none of what was queued
    assert not [r for r in caplog.records if r.name == "gateway.outbox"]


async def test_a_connection_refusing_a_write_does_not_hold_back_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outbox = Outbox(asyncio.get_running_loop())
    async with pairs(3) as (first, refusing, last):
        refusing.transport.write_eof()  # from now on its write() raises
        with caplog.at_level(logging.ERROR, logger="gateway.outbox"):
            for pair in (first, refusing, last):
                outbox.write(pair.transport, b"answer")
            assert await first.received(6) == b"answer"
            assert await last.received(6) == b"answer"
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.outbox"] == [
        "write failed"
    ]
