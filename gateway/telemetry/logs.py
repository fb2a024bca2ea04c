"""The JSON access log: one object per request on stdout, written in batches off the hot path.

Records hold only what the gateway decided and where; a token appears at most as the first
12 hex digits of its SHA-256, and API keys and secrets never reach a record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from gateway.base.tasks import spawn
from gateway.telemetry.writer import BatchWriter, ByteSink
from gateway.telemetry.writer import log as writer_log

FLUSH_INTERVAL_SECONDS: Final = 0.2
FLUSH_BYTES: Final = 64 * 1024
# What the writer thread may hold for a stdout that is not being read, about 10,000 lines; past
# it, lines are dropped and counted (`gateway_access_log_dropped_lines_total`).
MAX_UNWRITTEN_BYTES: Final = 4 * 1024 * 1024
# At shutdown, how long the lines still held may take to be written before they are given up.
CLOSE_TIMEOUT_SECONDS: Final = 5.0
# A `Final` name: the compiled build calls it from a C static, not through the orjson module.
_encode: Final = orjson.dumps


class AccessLog:
    """Lines kept as the bytes orjson made them, joined into batches of up to `FLUSH_BYTES` (or
    every `FLUSH_INTERVAL_SECONDS`) and written to a binary stream, stdout's own buffer by
    default, by a thread of their own (`BatchWriter`): a stdout nobody reads holds up that
    thread, never a request. Before `start` and after `close`, lines are written at once."""

    def __init__(self, stream: ByteSink | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flusher: asyncio.Task[None] | None = None
        self._writer: BatchWriter | None = None
        self._on_dropped: Callable[[int], None] = lambda lines: None

    def observe(self, on_dropped: Callable[[int], None]) -> None:
        """Report lines dropped (the metrics hook); called from the writer's thread too."""
        self._on_dropped = on_dropped

    def start(self) -> None:
        if self.enabled and self._flusher is None:
            self._writer = BatchWriter(self._stream, MAX_UNWRITTEN_BYTES, self._dropped)
            self._flusher = spawn(self._flush_periodically())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = _encode(record)
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES or self._flusher is None:
            self.flush()

    def flush(self) -> None:
        """Hand what is pending to the writer (to the stream itself when none runs)."""
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        data = b"\n".join(lines) + b"\n"
        if self._writer is not None:
            self._writer.offer(data, len(lines))
            return
        self._stream.write(data)
        self._stream.flush()

    def _dropped(self, lines: int) -> None:
        # What the writer calls: through here, a hook given to `observe` after `start` is used.
        self._on_dropped(lines)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            self.flush()

    async def close(self) -> None:
        """Write what is held, within `CLOSE_TIMEOUT_SECONDS`."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await writer.close()
        except TimeoutError:
            writer_log.warning("access log not written out at shutdown: stdout is not being read")


# Formatting a second once, not per line.
_formatted_second: Final[list[tuple[int, str]]] = [(-1, "")]
_MILLISECONDS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def utc_timestamp(epoch: float) -> str:
    second = int(epoch)
    cached_second, text = _formatted_second[0]
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _formatted_second[0] = (second, text)
    return text + _MILLISECONDS[min(999, int((epoch - second) * 1000))]


class JsonFormatter(logging.Formatter):
    """Operational log lines (startup, reload, errors) as JSON, like the access log."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would repeat ours without the decision; its server log may quote
    # request bytes, so only our handler (which logs exception types) reports protocol errors.
    logging.getLogger("aiohttp.access").disabled = True
    logging.getLogger("aiohttp.server").disabled = True
