"""The request target (400 `path_invalid`), and no body where a method has none."""

from __future__ import annotations

from typing import Final

from gateway.auth.target import Target, parse_target
from gateway.http.messages import Request
from gateway.refusals.reasons import Reason, Rejected

# Methods whose bodies many servers never read: such a body would be taken for the next request
# on the upstream connection, one the gateway never checked.
BODYLESS_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


def read_target(request: Request) -> Target:
    target = parse_target(request.raw_path)
    if request.method in BODYLESS_METHODS and (
        request.content_length or request.header("transfer-encoding") is not None
    ):
        raise Rejected(Reason.BODY_NOT_ALLOWED)
    return target
