"""The closed set of reasons a request is refused, each mapped once to the contract's answer.

Every stage raises `Rejected(Reason.X)`; nothing else decides a status code, a `WWW-Authenticate`
or `Retry-After` header, whether the connection closes after the answer, whether the session
counter moves, or the labels of a metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    message: str
    www_authenticate: str | None = None
    # When to try again; None where there is no fixed answer (a limited session's window ends
    # when its counter says, and the answer carries that instead).
    retry_after_seconds: int | None = None


class Code(Enum):
    """The error codes SDKs read; the value is the status and the fixed parts of the answer."""

    BAD_REQUEST = ErrorSpec(400, "The request is malformed or ambiguous.")
    TOKEN_NOT_PROVIDED = ErrorSpec(
        401, "An SDK authentication token is required for identified users.", "Bearer"
    )
    TOKEN_EXPIRED = ErrorSpec(
        401, "The SDK authentication token has expired.", 'Bearer error="invalid_token"'
    )
    TOKEN_REJECTED = ErrorSpec(
        401, "The SDK authentication token was rejected.", 'Bearer error="invalid_token"'
    )
    API_KEY_NOT_PROVIDED = ErrorSpec(401, "An API key is required.")
    API_KEY_REJECTED = ErrorSpec(401, "The API key was rejected.")
    ROUTE_NOT_FOUND = ErrorSpec(404, "No route matches this path.")
    METHOD_NOT_ALLOWED = ErrorSpec(405, "This route does not accept this method.")
    PAYLOAD_TOO_LARGE = ErrorSpec(413, "The request body is too large.")
    UNSUPPORTED_MEDIA_TYPE = ErrorSpec(415, "The request body's type or encoding is not supported.")
    AUTH_FAILURE_LIMIT = ErrorSpec(429, "Too many consecutive authentication failures.")
    INTERNAL_ERROR = ErrorSpec(500, "The gateway failed to handle this request.")
    UPSTREAM_UNAVAILABLE = ErrorSpec(
        502, "The tracking API could not be reached; retry later.", retry_after_seconds=1
    )
    SHUTTING_DOWN = ErrorSpec(503, "The gateway is shutting down; retry on another instance.")
    KEYS_UNAVAILABLE = ErrorSpec(
        503, "Verification keys are unavailable; retry later.", retry_after_seconds=5
    )
    UPSTREAM_TIMEOUT = ErrorSpec(504, "The tracking API did not answer in time.")
    HTTP_VERSION_NOT_SUPPORTED = ErrorSpec(505, "Only HTTP/1.1 and HTTP/1.0 are served here.")

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def counts_for_session(self) -> bool:
        """Only token failures move a session's counter."""
        return self.name.startswith("TOKEN_")


@dataclass(frozen=True, slots=True)
class ReasonSpec:
    code: Code
    phrase: str
    message: str | None = None  # in place of the code's message, when the reason says more
    # The connection closes after the answer: the rest of the request was not read (it is
    # only dropped for a moment), or the gateway is going away.
    closes: bool = False
    upstream_error: str | None = None  # the `kind` of gateway_upstream_errors_total


def _r(
    code: Code,
    phrase: str,
    message: str | None = None,
    *,
    closes: bool = False,
    upstream_error: str | None = None,
) -> ReasonSpec:
    return ReasonSpec(code, phrase, message, closes, upstream_error)


class Reason(Enum):
    """Why a request was refused. `phrase` is the stable `reason` of the answer and the logs."""

    # path and route
    PATH_INVALID = _r(Code.BAD_REQUEST, "path_invalid")
    ROUTE_NOT_FOUND = _r(Code.ROUTE_NOT_FOUND, "route_not_found")
    METHOD_NOT_ALLOWED = _r(Code.METHOD_NOT_ALLOWED, "method_not_allowed")
    PROJECT_HEADER_MISSING = _r(Code.BAD_REQUEST, "project_header_missing")
    PROJECT_HEADER_DUPLICATE = _r(Code.BAD_REQUEST, "project_header_duplicate")
    # sizes and encodings
    BODY_TOO_LARGE = _r(Code.PAYLOAD_TOO_LARGE, "body_too_large", closes=True)
    BODY_TIMEOUT = _r(Code.BAD_REQUEST, "body_timeout", closes=True)
    BODY_NOT_ALLOWED = _r(Code.BAD_REQUEST, "body_not_allowed", closes=True)
    DECOMPRESSED_TOO_LARGE = _r(Code.PAYLOAD_TOO_LARGE, "decompressed_too_large", closes=True)
    ENCODING_UNSUPPORTED = _r(
        Code.UNSUPPORTED_MEDIA_TYPE,
        "encoding_unsupported",
        "Content-Encoding other than one of gzip, deflate or identity; this route reads JSON.",
    )
    ENCODING_INVALID = _r(Code.BAD_REQUEST, "encoding_invalid")
    MEDIA_TYPE_FORM = _r(
        Code.UNSUPPORTED_MEDIA_TYPE,
        "media_type_unsupported",
        "Media type application/x-www-form-urlencoded; this route reads JSON.",
    )
    MEDIA_TYPE_MULTIPART = _r(
        Code.UNSUPPORTED_MEDIA_TYPE,
        "media_type_unsupported",
        "Media type multipart/*; this route reads JSON.",
    )
    MEDIA_TYPE_INVALID = _r(
        Code.UNSUPPORTED_MEDIA_TYPE,
        "media_type_invalid",
        "Content-Type is not one media type as RFC 9110 writes it; this route reads JSON.",
    )
    CHARSET_UNSUPPORTED = _r(
        Code.UNSUPPORTED_MEDIA_TYPE,
        "charset_unsupported",
        "A charset other than UTF-8; this route reads UTF-8 JSON.",
    )
    # api key
    API_KEY_MISSING = _r(Code.API_KEY_NOT_PROVIDED, "api_key_missing")
    API_KEY_INVALID = _r(Code.API_KEY_REJECTED, "api_key_invalid")
    # identity and other request parts
    JSON_INVALID = _r(Code.BAD_REQUEST, "json_invalid")
    DUPLICATE_KEY = _r(Code.BAD_REQUEST, "duplicate_key")
    CASE_VARIANT_KEY = _r(Code.BAD_REQUEST, "case_variant_key")
    KEY_CONTROL_CHARACTER = _r(Code.BAD_REQUEST, "key_control_character")
    IDENTITY_NOT_OBJECT = _r(Code.BAD_REQUEST, "identity_path_not_object")
    IDENTITY_NOT_ARRAY = _r(Code.BAD_REQUEST, "identity_path_not_array")
    IDENTITY_INVALID = _r(Code.BAD_REQUEST, "identity_invalid")
    IDENTITY_CONFLICT = _r(Code.BAD_REQUEST, "identity_conflict")
    HEADER_DUPLICATE = _r(Code.BAD_REQUEST, "header_duplicate")
    HEADER_INVALID = _r(Code.BAD_REQUEST, "header_invalid")
    QUERY_DUPLICATE = _r(Code.BAD_REQUEST, "query_duplicate")
    QUERY_INVALID = _r(Code.BAD_REQUEST, "query_invalid")
    SESSION_ID_TOO_LONG = _r(Code.BAD_REQUEST, "session_id_too_long")
    SESSION_ID_INVALID = _r(Code.BAD_REQUEST, "session_id_invalid")
    # token extraction
    TOKEN_MISSING = _r(Code.TOKEN_NOT_PROVIDED, "token_missing")
    TOKEN_DUPLICATE = _r(Code.TOKEN_REJECTED, "token_duplicate")
    TOKEN_TOO_LARGE = _r(Code.TOKEN_REJECTED, "token_too_large")
    # keys
    KEYS_UNAVAILABLE = _r(Code.KEYS_UNAVAILABLE, "keys_unavailable")
    # token header and signature
    TOKEN_MALFORMED = _r(Code.TOKEN_REJECTED, "malformed")
    TOKEN_DUPLICATE_KEY = _r(Code.TOKEN_REJECTED, "duplicate_key")
    ALG_MISSING = _r(Code.TOKEN_REJECTED, "alg_missing")
    ALG_NOT_ALLOWED = _r(Code.TOKEN_REJECTED, "alg_not_allowed")
    TYP_MISSING = _r(Code.TOKEN_REJECTED, "typ_missing")
    TYP_INVALID = _r(Code.TOKEN_REJECTED, "typ_invalid")
    CRIT_UNSUPPORTED = _r(Code.TOKEN_REJECTED, "crit_unsupported")
    KID_INVALID = _r(Code.TOKEN_REJECTED, "kid_invalid")
    KID_UNKNOWN = _r(Code.TOKEN_REJECTED, "kid_unknown")
    NO_COMPATIBLE_KEY = _r(Code.TOKEN_REJECTED, "no_compatible_key")
    SIGNATURE_INVALID = _r(Code.TOKEN_REJECTED, "signature_invalid")
    # claims
    EXPIRED = _r(Code.TOKEN_EXPIRED, "expired")
    EXP_MISSING = _r(Code.TOKEN_REJECTED, "exp_missing")
    EXP_INVALID = _r(Code.TOKEN_REJECTED, "exp_invalid")
    NBF_INVALID = _r(Code.TOKEN_REJECTED, "nbf_invalid")
    IAT_INVALID = _r(Code.TOKEN_REJECTED, "iat_invalid")
    NOT_YET_VALID = _r(Code.TOKEN_REJECTED, "not_yet_valid")
    ISSUED_IN_FUTURE = _r(Code.TOKEN_REJECTED, "issued_in_future")
    LIFETIME_TOO_LONG = _r(Code.TOKEN_REJECTED, "lifetime_too_long")
    AUDIENCE_INVALID = _r(Code.TOKEN_REJECTED, "audience_invalid")
    ISSUER_INVALID = _r(Code.TOKEN_REJECTED, "issuer_invalid")
    SUBJECT_INVALID = _r(Code.TOKEN_REJECTED, "subject_invalid")
    SUBJECT_MISMATCH = _r(Code.TOKEN_REJECTED, "subject_mismatch")
    # gateway and upstream
    # A token failure in a session past its threshold: the answer is the 429, its body names the
    # failure as its cause (`render_error(SESSION_LIMITED, cause=...)`).
    SESSION_LIMITED = _r(Code.AUTH_FAILURE_LIMIT, "session_limited")
    SHUTTING_DOWN = _r(Code.SHUTTING_DOWN, "shutting_down", closes=True)
    UPSTREAM_CONNECT = _r(
        Code.UPSTREAM_UNAVAILABLE, "upstream_connect_failed", upstream_error="connect"
    )
    UPSTREAM_BROKEN = _r(Code.UPSTREAM_UNAVAILABLE, "upstream_failed", upstream_error="other")
    UPSTREAM_TIMEOUT = _r(Code.UPSTREAM_TIMEOUT, "upstream_timeout", upstream_error="timeout")
    INTERNAL = _r(Code.INTERNAL_ERROR, "internal_error")
    HTTP_MALFORMED = _r(Code.BAD_REQUEST, "http_malformed", closes=True)
    HTTP_VERSION_UNSUPPORTED = _r(
        Code.HTTP_VERSION_NOT_SUPPORTED, "http_version_unsupported", closes=True
    )

    @property
    def code(self) -> Code:
        return self.value.code

    @property
    def phrase(self) -> str:
        return self.value.phrase

    @property
    def message(self) -> str:
        return self.value.message or self.value.code.value.message

    @property
    def closes(self) -> bool:
        return self.value.closes

    @property
    def upstream_error(self) -> str | None:
        return self.value.upstream_error


class Rejected(Exception):  # a verdict on the request, not an error of the gateway
    """Raised by any stage to refuse a request; carries nothing a client sent."""

    __slots__ = ("reason",)

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason.phrase)
        self.reason = reason


class MethodNotAllowed(Rejected):
    """The path is routed, but not for this method: `allow` lists the methods that are."""

    __slots__ = ("allow",)

    def __init__(self, allow: str) -> None:
        super().__init__(Reason.METHOD_NOT_ALLOWED)
        self.allow = allow
