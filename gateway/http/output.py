"""A connection's writing side: writes gathered in the outbox, whether the client is taking
them, waiting until it does, and the two ways to end (close after what is written, or reset)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Final

from gateway.http.outbox import Outbox

# Written answers wait in the outbox until the end of the loop's pass, where the transport
# cannot see them: past this much (the transport's default high-water mark) they are handed to
# it at once, so that it can say whether to pause.
UNSENT_BYTES: Final = 64 * 1024
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, zero seconds: close sends RST


class Output:
    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox) -> None:
        self._loop = loop
        self._outbox = outbox
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._unsent = 0  # bytes written since this connection last flushed its outbox
        self._drained: asyncio.Future[None] | None = None
        # Since when the transport has been past its high-water mark, None while it takes writes.
        self.stalled_since: float | None = None

    def time(self) -> float:
        return self._loop.time()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self._outbox.write(self.transport, data)
            self._unsent += len(data)
            if self._unsent > UNSENT_BYTES:
                # Counted since the last flush of ours, not the outbox's end of pass: at worst
                # one answer in UNSENT_BYTES is sent a pass early.
                self.flush()

    def send_now(self, data: bytes) -> None:
        """Written and handed to the transport at once, not at the end of the loop's pass."""
        self.write(data)
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.closed:
            self._unsent = 0
            self._outbox.flush(self.transport)

    # --- whether the client takes what is written ----------------------------------------------

    def stalled(self) -> None:
        self.stalled_since = self._loop.time()

    def resumed(self) -> None:
        self.stalled_since = None
        self._wake()

    def lost(self) -> None:
        self.closed = True
        self._wake()

    async def drain(self, deadline: float | None = None) -> bool:
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

    def _wake(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # --- ending --------------------------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._outbox.flush(self.transport)
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection with a reset: an answer broken midway must never look complete
        (a FIN would end an HTTP/1.0 body as if whole), and what a client that reads nothing
        was sent must not stay queued in the kernel behind a FIN it never takes."""
        if self.transport is not None:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            self.transport.abort()
