"""The embedded failure counter: one process's memory, least recently used sessions evicted."""

from __future__ import annotations

import math
from collections import OrderedDict

from gateway.base.clock import Clock
from gateway.counters import FailureCount, SessionKey


class MemoryFailureCounter:
    backend = "memory"

    def __init__(self, *, ttl_seconds: int, max_sessions: int, clock: Clock) -> None:
        self._ttl = ttl_seconds
        self._max_sessions = max_sessions
        self._clock = clock
        # session → (count, end of the window fixed at the session's first failure)
        self._sessions: OrderedDict[SessionKey, tuple[int, float]] = OrderedDict()
        self._held_hints: dict[int, int] = {}  # session_hint → sessions held with it

    async def record_failure(self, key: SessionKey) -> FailureCount:
        now = self._clock.now()
        count, window_end = self._sessions.get(key, (0, 0.0))
        if not count:
            self._held_hints[key.hint] = self._held_hints.get(key.hint, 0) + 1
        if window_end <= now:
            count, window_end = 0, now + self._ttl
        count += 1
        self._sessions[key] = (count, window_end)
        self._sessions.move_to_end(key)
        if len(self._sessions) > self._max_sessions:
            self._forget(self._sessions.popitem(last=False)[0])
        return FailureCount(count, max(1, math.ceil(window_end - now)))

    def reset(self, key: SessionKey) -> None:
        if self._sessions.pop(key, None) is not None:
            self._forget(key)

    def may_hold(self, hint: int) -> bool:
        return hint in self._held_hints

    def _forget(self, key: SessionKey) -> None:
        left = self._held_hints[key.hint] - 1
        if left:
            self._held_hints[key.hint] = left
        else:
            del self._held_hints[key.hint]

    async def close(self) -> None:
        self._sessions.clear()
        self._held_hints.clear()

    def __len__(self) -> int:
        return len(self._sessions)
