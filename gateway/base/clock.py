"""The time source every time-dependent decision reads, so tests move time instead of sleeping."""

from __future__ import annotations

import time
from typing import Final

# The clocks the request path reads, as names of this module: the compiled build keeps a
# `Final` name in a C static, where `time.perf_counter()` would look the function up in the time
# module's dictionary on every call (several times a request).
system_time: Final = time.time
perf_counter: Final = time.perf_counter


class Clock:
    """The system's clock; `ManualClock` overrides it. A class the clocks derive from rather
    than a Protocol: the compiled build calls a method of a class it knows through its vtable,
    and a Protocol's through a generic attribute lookup and call, several times a request."""

    def now(self) -> float:
        """Seconds since the epoch: compared with `exp`, `nbf`, `iat` and counter windows."""
        return system_time()


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
