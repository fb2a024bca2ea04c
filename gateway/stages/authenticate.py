"""Mode + extraction + verification → one decision.

`authenticate` runs the sdk_jwt checks in the contract's order and raises `Rejected` at the
first failure; `Attempt` keeps what was learnt on the way, because a token failure is counted
against the session the request named even though the request itself was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.auth.extract import FoundToken, RequestParts, extract_session, extract_token
from gateway.auth.subject import Identity
from gateway.auth.verify import VerifiedToken
from gateway.config.projects import Project
from gateway.config.routes import API_KEY_SOURCE, Route
from gateway.refusals.reasons import Reason, Rejected


class AuthStatus:
    """`X-Auth-Status` as forwarded; `gateway_auth_decisions_total{decision}` adds `rejected`.
    Plain strings, not an Enum: every request reads one, and `.value` is a descriptor call."""

    VERIFIED: Final = "verified"
    ANONYMOUS: Final = "anonymous"
    DISABLED: Final = "disabled"
    UNVERIFIED: Final = "unverified"  # a `monitor` failure, forwarded anyway


@dataclass(slots=True)
class Attempt:
    identity: Identity | None = None
    session_id: str | None = None
    token: FoundToken | None = None
    verified: VerifiedToken | None = None


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
        attempt.identity, verified.user
    ):
        raise Rejected(Reason.SUBJECT_MISMATCH)
    attempt.verified = verified
    return AuthStatus.VERIFIED
