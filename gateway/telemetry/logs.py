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
from typing import Any, Final, Protocol

import orjson

from gateway.base.tasks import spawn

FLUSH_INTERVAL_SECONDS: Final = 0.2
FLUSH_BYTES: Final = 64 * 1024
# A `Final` name: the compiled build calls it from a C static, not through the orjson module.
_encode: Final = orjson.dumps


class ByteSink(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class AccessLog:
    """Lines kept as the bytes orjson made them and written to a binary stream (stdout's own
    buffer by default): no decoding to text and encoding back for every line."""

    def __init__(self, stream: ByteSink | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.enabled and self._flusher is None:
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
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        self._stream.write(b"\n".join(lines) + b"\n")
        self._stream.flush()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            self.flush()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()


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
