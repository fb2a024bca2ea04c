"""The time source every time-dependent decision reads, so tests move time instead of sleeping."""

from __future__ import annotations

import time


class Clock:
    """The system's clock; `ManualClock` overrides it. A class the clocks derive from rather
    than a Protocol: the compiled build calls a method of a class it knows through its vtable,
    and a Protocol's through a generic attribute lookup and call, several times a request."""

    def now(self) -> float:
        """Seconds since the epoch: compared with `exp`, `nbf`, `iat` and counter windows."""
        return time.time()


class ManualClock(Clock):
    """A clock that only moves when told to; for tests and `token inspect --at`."""

    def __init__(self, start: float) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def set(self, when: float) -> None:
        self._now = when
