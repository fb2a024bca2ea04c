"""Background tasks that cannot be garbage-collected mid-flight (the event loop keeps only weak
references to tasks, so a fire-and-forget task must be held somewhere)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

T = TypeVar("T")

_running: Final[set[asyncio.Task[Any]]] = set()


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
