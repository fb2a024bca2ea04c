"""One strict reading of JSON, shared by request bodies and JWT segments.

A parser that silently keeps the last of two duplicate keys lets a request be authorised on one
value and processed on another, so duplicates, non-finite numbers, a BOM and invalid UTF-8 are
all refused here rather than interpreted.

Most documents take a fast path: orjson (which keeps the last duplicate) plus a proof that no
member was dropped. Anything the proof does not cover goes through the strict decoder.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any

import orjson


class JSONRejected(ValueError):
    """The document is not one unambiguous JSON value."""

    def __init__(
        self, message: str, *, duplicate_key: bool = False, control_in_key: bool = False
    ) -> None:
        super().__init__(message)
        self.duplicate_key = duplicate_key
        self.control_in_key = control_in_key


# C parsers such as cJSON read a key up to its first NUL (`"registered\u0000"` is `registered`
# to them), and other control characters are stripped or mangled by some readers: a key that
# holds one is never what it seems.
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise JSONRejected("duplicate key", duplicate_key=True)
    if _CONTROL.search("".join(obj)):
        raise JSONRejected("control character in a key", control_in_key=True)
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


# orjson reads an integer past 64 bits as a float where the upstream's reader keeps it exact:
# documents with a run of 19 digits take the strict decoder (a regex search costs 10x more).
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 19


def loads_strict(data: bytes) -> Any:
    """Parse exactly one JSON value from UTF-8 bytes, or raise `JSONRejected`."""
    # Without a backslash no string holds a control character but DEL, which JSON allows raw.
    if (
        b"\\" not in data
        and b"\x7f" not in data
        and _LONG_DIGIT_RUN not in data.translate(_DIGITS_AS_ZEROS)
    ):
        # What orjson refuses, the strict decoder below refuses too, and says why.
        with contextlib.suppress(orjson.JSONDecodeError, orjson.JSONEncodeError):
            value = orjson.loads(data)
            # Without escapes every string reads as written, and a colon outside a string
            # separates a member. orjson's re-encoding escapes no colon, so it holds as many as
            # the document exactly when no member was dropped: no key came twice.
            if data.count(b":") == orjson.dumps(value).count(b":"):
                return value
    return _loads_with_reasons(data)


def _loads_with_reasons(data: bytes) -> Any:
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
