"""One strict reading of JSON, shared by request bodies and JWT segments.

A parser that silently keeps the last of two duplicate keys lets a request be authorised on one
value and processed on another, so duplicates, non-finite numbers, a BOM and invalid UTF-8 are
all refused here rather than interpreted.

Most documents take a fast path: orjson (which keeps the last duplicate) plus a proof that no
member was dropped. Documents with integers past 64 bits or control characters in strings go
through the strict decoder, which says which rule failed.
"""

from __future__ import annotations

import gc
import json
import math
import re
from typing import Any, Final

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
_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")


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


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_float=_finite_float,
    parse_constant=_no_constants,
)


# orjson reads an integer past 64 bits as a float where the upstream's reader keeps it exact:
# documents with a run of 19 digits take the strict decoder (a regex search costs 10x more).
# The same translation turns DEL into a backslash, so one search finds either mark of a
# control character below.
_MARK_DIGITS_AND_DEL: Final = bytes.maketrans(b"123456789\x7f", b"000000000\\")
_LONG_DIGIT_RUN: Final = b"0" * 19
# What a control character (or DEL) in a string looks like: in a key, only the strict decoder
# finds it, since orjson's answer does not say which strings were keys. (Searched one by one:
# a regex stopping at every backslash costs 25 ms on a megabyte of `\u0061`.)
_CONTROL_MARKS: Final = (
    *(b"\\" + c for c in (b"b", b"f", b"n", b"r", b"t", b"u000", b"u001", b"u007f", b"u007F")),
    b"\x7f",
)


def _holds(data: bytes, part: bytes) -> bool:
    # `part in data` asks first whether `part` is an integer (a byte value), and on 3.11 the
    # TypeError it formats and drops costs more than the search itself.
    return data.find(part) != -1


# Below this, a document holds too few containers for a collection to matter, and pausing the
# collector would cost more than reading it (a token's payload, a single event).
_PAUSE_COLLECTOR_FROM: Final = 2048


# orjson's functions as `Final` names, which the compiled build calls from C statics rather than
# looking each up in the orjson module on every call.
_orjson_decode: Final = orjson.loads
_orjson_encode: Final = orjson.dumps


def _orjson_loads(data: bytes) -> Any:
    try:
        return _orjson_decode(data)
    except orjson.JSONDecodeError as exc:
        # Anything orjson refuses is refused: BOM, invalid UTF-8, NaN, lone surrogates (which
        # readers repair in different ways), nesting past 1024 levels, and malformed text.
        raise JSONRejected(f"malformed ({exc.msg})") from None


def loads_strict(data: bytes) -> Any:
    """Parse exactly one JSON value from UTF-8 bytes, or raise `JSONRejected`."""
    marked = data.translate(_MARK_DIGITS_AND_DEL)
    may_escape = _holds(marked, b"\\")  # a backslash or DEL; without one, nothing is escaped
    if _holds(marked, _LONG_DIGIT_RUN) or (
        may_escape and any(_holds(data, mark) for mark in _CONTROL_MARKS)
    ):
        return _loads_with_reasons(data)
    if len(data) < _PAUSE_COLLECTOR_FROM:
        value = _orjson_loads(data)
    else:
        # orjson builds a container per object and array; the cyclic collector, run every 700
        # of them, would cost as much again on a body of many small objects. Nothing it builds
        # can be part of a cycle.
        collecting = gc.isenabled()
        gc.disable()
        try:
            value = _orjson_loads(data)
        finally:
            if collecting:
                gc.enable()
    # orjson keeps the last of duplicate keys. Its re-encoding writes every colon as a colon:
    # the structural ones (one per member kept) and those inside strings, including the ones
    # the document escaped. So it holds as many colons as the document plus its escaped ones
    # exactly when no member was dropped. (`\u003a` after an escaped backslash is text, not an
    # escape: counted, it can only make a document look as if it lost a member, so such a
    # document is read again by the strict decoder.)
    expected = data.count(b":")
    escapes_colon = may_escape and _holds(data, b"\\u003")
    if escapes_colon:
        expected += data.count(b"\\u003a") + data.count(b"\\u003A")
    try:
        encoded = _orjson_encode(value)
    except orjson.JSONEncodeError:  # past 254 levels: no event nests so deep
        raise JSONRejected("nested too deeply") from None
    if encoded.count(b":") != expected:
        if escapes_colon:
            return _loads_with_reasons(data)
        raise JSONRejected("duplicate key", duplicate_key=True)
    return value


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
