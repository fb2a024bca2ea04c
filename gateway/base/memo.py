"""Results computed once per distinct input on the request path: header names, targets, route
matches, media types, upstream heads, token header segments.

Clients send the same few of each again and again. A memo holds at most `size` of them and
starts afresh when full, so inputs an attacker varies cost a recomputation, never memory.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedMemo(dict[K, V]):
    """A dict read with the plain `get` (no call on the hot path beyond it); filled by `keep`."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: K, value: V) -> V:
        if len(self) >= self.size:
            self.clear()
        self[key] = value
        return value
