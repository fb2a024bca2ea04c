"""The request target: a path and a query, each accepted only in a form with one reading.

The path is RFC 3986 unreserved characters and `/`, with no empty, `.` or `..` segment (it may
end in `/`), so the path matched is byte for byte the path forwarded and no upstream can
normalise it into another route. The query is kept raw, as received.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from gateway.base.memo import BoundedMemo
from gateway.refusals.reasons import Reason, Rejected

_PATH: Final = re.compile(r"/|(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._~-]+)+/?")
_QUERY: Final = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*")
SEGMENT_CHARS: Final = "[A-Za-z0-9._~-]+"  # one path segment, as the path grammar allows it


@dataclass(frozen=True, slots=True)
class Target:
    path: str
    query: str | None  # raw, as received; None when the target has no `?`


# Valid targets; refused ones not kept.
_targets: Final[BoundedMemo[str, Target]] = BoundedMemo(4096)


def parse_target(raw: str) -> Target:
    target = _targets.get(raw)
    return target if target is not None else _targets.keep(raw, _parse_target(raw))


def _parse_target(raw: str) -> Target:
    path, sep, query = raw.partition("?")
    if not _PATH.fullmatch(path):
        raise Rejected(Reason.PATH_INVALID)
    if sep and not _QUERY.fullmatch(query):
        raise Rejected(Reason.PATH_INVALID)
    return Target(path, query if sep else None)
