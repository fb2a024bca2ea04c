"""The checks in the contract's order: encoding and media type, `api_key`, then `sdk_jwt`
(identity, session, token, keys, signature, claims, subject) → one decision.

`check` raises what every mode refuses and returns an `sdk_jwt` failure for the pipeline to
count, refuse or forward. `Attempt` keeps what was learnt on the way, because a token failure is
counted against the session the request named even though the request itself was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from gateway.auth.body import NOT_READ, JsonBody
from gateway.auth.extract import (
    FoundToken,
    RequestParts,
    extract_session,
    extract_token,
    parse_query,
)
from gateway.auth.subject import Identity
from gateway.auth.target import Target
from gateway.auth.verified import VerifiedToken, token_user
from gateway.config.projects import Project
from gateway.config.routes import API_KEY_SOURCE, Route
from gateway.config.settings import LimitsSettings
from gateway.refusals.reasons import Code, Reason, Rejected


class AuthStatus:
    """`X-Auth-Status` as forwarded; `gateway_auth_decisions_total{decision}` adds `rejected`.
    Plain strings, not an Enum: every request reads one, and `.value` is a descriptor call."""

    VERIFIED: Final = "verified"
    ANONYMOUS: Final = "anonymous"
    DISABLED: Final = "disabled"
    UNVERIFIED: Final = "unverified"  # a `monitor` failure, forwarded anyway


@dataclass(slots=True)
class Attempt:
    identity: Identity | None
    session_id: str | None
    token: FoundToken | None
    verified: VerifiedToken | None

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(
        self,
        identity: Identity | None = None,
        session_id: str | None = None,
        token: FoundToken | None = None,
        verified: VerifiedToken | None = None,
    ) -> None:
        self.identity = identity
        self.session_id = session_id
        self.token = token
        self.verified = verified


def check_api_key(project: Project, parts: RequestParts) -> None:
    values = parts.headers.get(API_KEY_SOURCE.name, ())
    keys = [v.strip()[6:].strip() for v in values if v.strip()[:6].lower() == "token "]
    if not keys:
        raise Rejected(Reason.API_KEY_MISSING)
    if len(keys) > 1:
        raise Rejected(Reason.HEADER_DUPLICATE)
    if not project.api_key_matches(keys[0]):
        raise Rejected(Reason.API_KEY_INVALID)


def authenticate(
    route: Route, project: Project, parts: RequestParts, max_token_bytes: int, attempt: Attempt
) -> str:
    """VERIFIED or ANONYMOUS, filling `attempt` as it goes; raises `Rejected` otherwise."""
    attempt.identity = project.subject.identity(route.identity, parts)
    attempt.session_id = extract_session(route.session, parts)
    attempt.token = extract_token(route.token, parts, max_token_bytes)
    if attempt.token is None:
        if attempt.identity is None:
            return AuthStatus.ANONYMOUS
        raise Rejected(Reason.TOKEN_MISSING)
    if project.verifier is None:
        raise Rejected(Reason.KEYS_UNAVAILABLE)
    verified = project.verifier.verify(attempt.token.token, attempt.token.digest)
    if attempt.identity is not None and not project.subject.authorises(
        attempt.identity, token_user(verified)
    ):
        raise Rejected(Reason.SUBJECT_MISMATCH)
    attempt.verified = verified
    return AuthStatus.VERIFIED


@dataclass(slots=True)
class Checked:
    """What the checks made of a request: the body to forward and the auth outcome."""

    body: bytes
    decoded: bool  # the body was decompressed: it goes on without its Content-Encoding
    status: str
    attempt: Attempt
    failure: Reason | None

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.decoded = False
        self.status = AuthStatus.DISABLED
        self.attempt = Attempt()
        self.failure = None

    @property
    def token_fingerprint(self) -> str | None:
        """12 hex digits of the token's SHA-256, for the log."""
        token = self.attempt.token
        return None if token is None else token.digest[:6].hex()


# What `check` reads, kept together for a second run with fresh keys.
CheckInputs: TypeAlias = tuple[
    Route, Project, RequestParts, Target, bytes, JsonBody | None, LimitsSettings, str
]


def check(
    route: Route,
    project: Project,
    parts: RequestParts,
    target: Target,
    body: bytes,
    reading: JsonBody | None,
    limits: LimitsSettings,
    mode: str,
) -> Checked:
    """Raises what every mode refuses (an `api_key` failure, a body too large once decoded,
    any encoding problem in `required`); returns the rest as `failure`."""
    checked = Checked(body)
    if reading is not None:
        checked.body, checked.decoded = reading.forwarded, reading.decoded
        encoding_refused = reading.encoding_refused
        if encoding_refused is not None:
            if mode == "required" or encoding_refused.code is Code.PAYLOAD_TOO_LARGE:
                raise Rejected(encoding_refused)
            checked.failure = encoding_refused
    if route.api_key:
        check_api_key(project, parts)
    if mode == "disabled" or checked.failure is not None:
        return checked
    if reading is not None:
        checked.failure = reading.parse_refused
        if checked.failure is not None:
            return checked
        if reading.document is not NOT_READ:
            parts.body, parts.walked = reading.document, reading.walked
    try:
        if route.reads_query:
            parts.query = parse_query(target.query)
        checked.status = authenticate(
            route, project, parts, limits.max_token_bytes, checked.attempt
        )
    except Rejected as refused:
        checked.failure = refused.reason
    return checked
