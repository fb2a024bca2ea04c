"""A span around some work, for the layers that cannot know the tracer: while a request is
traced, its tracer sets `current`, and code anywhere starts `current.get()("name")` and ends
what it got; when no request is being traced, `current` is None and nothing else is paid."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Final, Protocol


class ChildSpan(Protocol):
    @property
    def traceparent(self) -> str:
        """The W3C `traceparent` naming this span, for a request sent on its behalf."""
        ...

    def note(self, key: str, value: str | int) -> None: ...

    def end(self) -> None: ...


SpanOpener = Callable[[str], ChildSpan]

current: Final[ContextVar[SpanOpener | None]] = ContextVar("gateway_span_opener", default=None)
