"""The gateway's own JSON answers, rendered from the reason table.

Bodies are assembled from pre-encoded parts: only the request id varies, and it is either one we
made or one that matched `[A-Za-z0-9._:-]{1,128}`, so it needs no escaping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Final

from gateway.refusals.reasons import Code, Reason


class ErrorFormat(Enum):
    STANDARD = "standard"
    BLOOMREACH = "bloomreach"


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    status: int
    headers: dict[str, str]
    body: bytes


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _standard_prefix(reason: Reason, cause: Code | None) -> str:
    code = Code.AUTH_FAILURE_LIMIT if cause else reason.code
    token_expired = reason.code is Code.TOKEN_EXPIRED
    error: dict[str, str] = {"code": code.name, "reason": reason.phrase}
    if cause:
        error["cause"] = cause.name
    error["message"] = code.value.message if cause else reason.message
    head = _dumps({"token_expired": token_expired, "error": error})
    return head[:-2] + ',"request_id":"'


def _bloomreach_prefix(reason: Reason, cause: Code | None) -> str:
    code = Code.AUTH_FAILURE_LIMIT if cause else reason.code
    body: dict[str, object] = {
        "token_expired": reason.code is Code.TOKEN_EXPIRED,
        "success": False,
        "error": code.value.message if cause else reason.message,
        "code": code.name,
        "reason": reason.phrase,
    }
    if cause:
        body["cause"] = cause.name
    return _dumps(body)[:-1] + ',"request_id":"'


# A newline ends each body, so a terminal shows curl's prompt on a line of its own.
_SUFFIX: Final = {ErrorFormat.STANDARD: '"}}\n', ErrorFormat.BLOOMREACH: '"}\n'}
_PREFIX_BUILDERS: Final = {
    ErrorFormat.STANDARD: _standard_prefix,
    ErrorFormat.BLOOMREACH: _bloomreach_prefix,
}


def _status(reason: Reason, error_format: ErrorFormat, limited: bool) -> int:
    if limited:
        return Code.AUTH_FAILURE_LIMIT.status
    if error_format is ErrorFormat.BLOOMREACH and reason.code is Code.TOKEN_NOT_PROVIDED:
        return 403  # the Bloomreach SDKs report TOKEN_NOT_PROVIDED only for a 403
    return reason.code.status


def _fixed_headers(reason: Reason, limited: bool) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    spec = reason.code.value
    if spec.www_authenticate and not limited:
        headers["WWW-Authenticate"] = spec.www_authenticate
    return headers


@dataclass(frozen=True, slots=True)
class _Template:
    status: int
    headers: dict[str, str]
    prefix: bytes
    suffix: bytes


def _build_templates() -> dict[tuple[Reason, ErrorFormat, bool], _Template]:
    templates = {}
    for reason in Reason:
        for error_format in ErrorFormat:
            for limited in (False, True):
                if limited and not reason.code.counts_for_session:
                    continue
                cause = reason.code if limited else None
                templates[reason, error_format, limited] = _Template(
                    status=_status(reason, error_format, limited),
                    headers=_fixed_headers(reason, limited),
                    prefix=_PREFIX_BUILDERS[error_format](reason, cause).encode(),
                    suffix=_SUFFIX[error_format].encode(),
                )
    return templates


_TEMPLATES: Final = _build_templates()


def render_error(
    reason: Reason,
    request_id: str,
    *,
    error_format: ErrorFormat = ErrorFormat.STANDARD,
    cause: Reason | None = None,
    retry_after: int | None = None,
    allow: str | None = None,
) -> ErrorAnswer:
    """The answer for `reason`. `SESSION_LIMITED` is the 429 whose body names its `cause`, the
    token failure that found the session past its threshold; `retry_after` overrides the
    reason's own (the session's window, for that 429)."""
    if reason is Reason.SESSION_LIMITED:
        assert cause is not None
        assert cause.code.counts_for_session
        template = _TEMPLATES[cause, error_format, True]
    else:
        template = _TEMPLATES[reason, error_format, False]
        if retry_after is None:
            retry_after = reason.code.value.retry_after_seconds
    headers = dict(template.headers)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if allow is not None:
        headers["Allow"] = allow
    body = template.prefix + request_id.encode() + template.suffix
    return ErrorAnswer(template.status, headers, body)
