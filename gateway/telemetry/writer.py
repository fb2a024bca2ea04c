"""A thread that writes batches of log lines to a blocking stream, so the event loop never does.

stdout is usually a pipe to a log collector. When the collector stalls or dies, the pipe fills
and every `write()` to it blocks: done on the event loop, that would stop every request of the
process until the reader came back. Here only this thread waits. What it holds is bounded by
bytes; a batch offered past the bound is refused, and its lines are counted as dropped rather
than held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

log: Final = logging.getLogger("gateway.access_log")


class ByteSink(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class BatchWriter:
    def __init__(self, stream: ByteSink, max_bytes: int, on_dropped: Callable[[int], None]) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._on_dropped = on_dropped  # called with a number of lines, from either thread
        self._batches: deque[tuple[bytes, int]] = deque()
        self._held_bytes = 0  # queued, and the batch being written
        self._closing = False
        self._failed = False
        self._wakeup = threading.Condition()
        self._stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def offer(self, data: bytes, lines: int) -> None:
        """Queue `data` (holding `lines` lines) for the thread, or drop it past the bound."""
        with self._wakeup:
            if self._closing or self._held_bytes + len(data) > self._max_bytes:
                dropped = True
            else:
                dropped = False
                self._batches.append((data, lines))
                self._held_bytes += len(data)
                self._wakeup.notify()
        if dropped:
            self._on_dropped(lines)

    async def close(self) -> None:
        """Write what is queued, then stop the thread. (Under a timeout, a stream that never
        takes it leaves the thread blocked, a daemon, with what it holds.)"""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        await asyncio.shield(self._stopped)

    def _run(self) -> None:
        loop = self._stopped.get_loop()
        try:
            while (batch := self._next()) is not None:
                data, lines = batch
                try:
                    self._stream.write(data)
                    self._stream.flush()
                except (OSError, ValueError) as exc:  # a closed pipe, a closed file
                    if not self._failed:  # once: the stream is not coming back
                        self._failed = True
                        log.warning("access log lines lost", extra={"fields": {"error": str(exc)}})
                    self._on_dropped(lines)
                finally:
                    with self._wakeup:
                        self._held_bytes -= len(data)
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, self._stopped)

    def _next(self) -> tuple[bytes, int] | None:
        with self._wakeup:
            while not self._batches and not self._closing:
                self._wakeup.wait()
            return self._batches.popleft() if self._batches else None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
