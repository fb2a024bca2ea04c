"""One strict reading of JSON, shared by request bodies and JWT segments.

A parser that silently keeps the last of two duplicate keys lets a request be authorised on one
value and processed on another, so duplicates, non-finite numbers, a BOM and invalid UTF-8 are
all refused here rather than interpreted.
"""

from __future__ import annotations

import json
import math
from typing import Any


class JSONRejected(ValueError):
    """The document is not one unambiguous JSON value."""

    def __init__(self, message: str, *, duplicate_key: bool = False) -> None:
        super().__init__(message)
        self.duplicate_key = duplicate_key


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise JSONRejected("duplicate key", duplicate_key=True)
    return obj


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRejected("number out of range")
    return value


def _no_constants(name: str) -> Any:
    raise JSONRejected(f"{name} is not JSON")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_float=_finite_float,
    parse_constant=_no_constants,
)


def loads_strict(data: bytes) -> Any:
    """Parse exactly one JSON value from UTF-8 bytes, or raise `JSONRejected`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise JSONRejected("not UTF-8") from None
    if text.startswith("\ufeff"):
        raise JSONRejected("byte order mark")
    try:
        return _DECODER.decode(text)
    except JSONRejected:
        raise
    except RecursionError:
        raise JSONRejected("nested too deeply") from None
    except ValueError:  # JSONDecodeError, and int() past Python's digit limit
        raise JSONRejected("malformed") from None
