"""What the Python upstreams share: the route table they are started with, and JSON paths.

Every upstream stack is started with the same route table (a JSON argument), names the route
by the request path's suffix, reads the places that route names, and records one reading per
request it processed: the request id, `X-Auth-Status` and `X-Authenticated-User` as it read
them, and every value it found at each place (null and absent values are no user).
"""

from __future__ import annotations

import json
import threading
from typing import Any

JsonPath = list[tuple[str, bool]]  # (key, followed by [*])


def parse_path(path: str) -> JsonPath:
    """`batch[*].userId` → [("batch", True), ("userId", False)]."""
    steps: JsonPath = []
    for piece in path.split("."):
        star = piece.endswith("[*]")
        steps.append((piece[:-3] if star else piece, star))
    return steps


def walk(document: Any, path: str) -> list[Any]:
    """Every value at `path`, read with plain dict lookups (the parser decided the keys)."""
    current = [document]
    for key, star in parse_path(path):
        following: list[Any] = []
        for node in current:
            if isinstance(node, dict) and key in node:
                value = node[key]
                if star:
                    following.extend(value if isinstance(value, list) else [])
                else:
                    following.append(value)
        current = following
    return [value for value in current if value is not None]


def route_for(routes: dict[str, dict[str, Any]], path: str) -> dict[str, Any] | None:
    for route in routes.values():
        if path.endswith(route["suffix"]):
            return dict(route)
    return None


class Records:
    """The readings so far, served to the test at GET /__records."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)

    def dump(self) -> bytes:
        with self._lock:
            return json.dumps(self._records).encode()
