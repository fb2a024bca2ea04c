"""The checks: `check_api_key`, `authenticate` and `check`, which runs them in the contract's
order. `check` raises what every mode refuses (an API key failure, a body too large once
decoded, any encoding problem in `required`) and returns every other failure for the pipeline
to count, refuse or forward; `Attempt` keeps what was learnt on the way."""

from __future__ import annotations

import gzip
import hashlib
import json

import pytest

from gateway.auth.extract import RequestParts
from gateway.auth.verified import token_exp, token_kid, token_user
from gateway.config.compiled import CompiledConfig
from gateway.http.messages import Request
from gateway.refusals.reasons import Reason, Rejected
from gateway.stages.authenticate import (
    Attempt,
    AuthStatus,
    Checked,
    authenticate,
    check,
    check_api_key,
)
from tests.conftest import NOW, Tokens
from tests.stages.support import EVENTS, check_inputs, json_post, make_request

ANONYMOUS = b'{"customer_ids": {"cookie": "c-1"}}'
KEYED = "/keyed/keyed/events"
WATCHED = "/track/v2/projects/watch/customers/events"


def registered(user: str) -> bytes:
    return json.dumps({"customer_ids": {"registered": user}}).encode()


async def checked(config: CompiledConfig, request: Request) -> Checked:
    return check(*await check_inputs(config, request))


async def refused(config: CompiledConfig, request: Request) -> Reason:
    inputs = await check_inputs(config, request)
    with pytest.raises(Rejected) as raised:
        check(*inputs)
    return raised.value.reason


# --- check_api_key -----------------------------------------------------------------------------


def keyed_parts(*values: str) -> RequestParts:
    return RequestParts({"authorization": list(values)}, {})


def test_no_authorization_header_is_api_key_missing(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as raised:
        check_api_key(config.project("keyed"), RequestParts({}, {}))
    assert raised.value.reason is Reason.API_KEY_MISSING


def test_an_authorization_of_another_scheme_is_api_key_missing(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as raised:
        check_api_key(config.project("keyed"), keyed_parts("Bearer sdk-secret-1"))
    assert raised.value.reason is Reason.API_KEY_MISSING


def test_two_api_keys_are_a_duplicate_header(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as raised:
        check_api_key(
            config.project("keyed"), keyed_parts("Token sdk-secret-1", "Token sdk-secret-1")
        )
    assert raised.value.reason is Reason.HEADER_DUPLICATE


def test_a_wrong_api_key_is_api_key_invalid(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as raised:
        check_api_key(config.project("keyed"), keyed_parts("Token sdk-secret-2"))
    assert raised.value.reason is Reason.API_KEY_INVALID


def test_the_scheme_without_a_key_is_api_key_missing(config: CompiledConfig) -> None:
    with pytest.raises(Rejected) as raised:
        check_api_key(config.project("keyed"), keyed_parts("Token   "))
    assert raised.value.reason is Reason.API_KEY_MISSING


def test_the_api_key_scheme_is_read_in_any_case_and_spacing(config: CompiledConfig) -> None:
    check_api_key(config.project("keyed"), keyed_parts("  tOKEN   sdk-secret-1 "))


def test_an_api_key_and_a_bearer_token_may_share_the_header(config: CompiledConfig) -> None:
    check_api_key(config.project("keyed"), keyed_parts("Bearer abc", "Token sdk-secret-1"))


# --- authenticate ------------------------------------------------------------------------------


def test_authenticate_fills_the_attempt_of_an_anonymous_request(config: CompiledConfig) -> None:
    route, _ = config.router.match("POST", EVENTS)
    attempt = Attempt()
    parts = RequestParts({"x-session-id": ["s-1"]}, {})
    status = authenticate(route, config.project("app"), parts, 8192, attempt)
    assert status == AuthStatus.ANONYMOUS
    assert attempt == Attempt(identity=None, session_id="s-1", token=None, verified=None)


def test_authenticate_raises_keys_unavailable_without_any_key(
    config: CompiledConfig, tokens: Tokens
) -> None:
    """`rotating` has only a JWKS URL, never fetched: no key can verify, the gateway's fault."""
    route, _ = config.router.match("POST", EVENTS)
    parts = RequestParts({"x-sdk-auth-token": [tokens.good()]}, {})
    with pytest.raises(Rejected) as raised:
        authenticate(route, config.project("rotating"), parts, 8192, Attempt())
    assert raised.value.reason is Reason.KEYS_UNAVAILABLE


# --- check: what every mode refuses ------------------------------------------------------------


async def test_an_api_key_route_refuses_a_missing_key_whatever_the_mode(
    config: CompiledConfig,
) -> None:
    assert config.project("keyed").mode == "disabled"
    assert await refused(config, json_post(KEYED, b"{}")) is Reason.API_KEY_MISSING


async def test_an_api_key_route_passes_its_key(config: CompiledConfig) -> None:
    request = json_post(KEYED, b"{}", [("Authorization", "Token sdk-secret-1")])
    result = await checked(config, request)
    assert result.failure is None
    assert result.status == AuthStatus.DISABLED


async def test_required_refuses_an_unsupported_coding(config: CompiledConfig) -> None:
    request = json_post(EVENTS, b"\x00", [("Content-Encoding", "br")])
    assert await refused(config, request) is Reason.ENCODING_UNSUPPORTED


async def test_monitor_returns_an_unsupported_coding_without_checking_the_token(
    config: CompiledConfig, tokens: Tokens
) -> None:
    """`monitor` forwards what `required` refuses, marked; the token is not read then."""
    request = json_post(
        WATCHED, b"\x00", [("Content-Encoding", "br"), ("X-Sdk-Auth-Token", tokens.good())]
    )
    result = await checked(config, request)
    assert result.failure is Reason.ENCODING_UNSUPPORTED
    assert result.attempt.token is None
    assert result.body == b"\x00"
    assert not result.decoded


async def test_monitor_still_refuses_a_body_too_large_once_decoded(
    config: CompiledConfig,
) -> None:
    limit = config.settings.limits.max_decompressed_bytes
    bomb = gzip.compress(b'{"pad": "' + b"a" * limit + b'"}')
    request = json_post(WATCHED, bomb, [("Content-Encoding", "gzip")])
    assert await refused(config, request) is Reason.DECOMPRESSED_TOO_LARGE


# --- check: sdk_jwt outcomes -------------------------------------------------------------------


async def test_a_request_naming_no_user_and_carrying_no_token_is_anonymous(
    config: CompiledConfig,
) -> None:
    result = await checked(config, json_post(EVENTS, ANONYMOUS))
    assert result.failure is None
    assert result.status == AuthStatus.ANONYMOUS
    assert result.token_fingerprint is None


async def test_an_identified_request_without_a_token_fails_token_missing(
    config: CompiledConfig,
) -> None:
    """Returned, not raised: the pipeline counts it against the session and decides by mode."""
    result = await checked(config, json_post(EVENTS, registered("alice")))
    assert result.failure is Reason.TOKEN_MISSING
    assert result.attempt.identity == "alice"


async def test_a_token_for_the_user_named_is_verified(
    config: CompiledConfig, tokens: Tokens
) -> None:
    token = tokens.good("alice")
    request = json_post(EVENTS, registered("alice"), [("Authorization", f"Bearer {token}")])
    result = await checked(config, request)
    assert result.failure is None
    assert result.status == AuthStatus.VERIFIED
    verified = result.attempt.verified
    assert verified is not None
    user, kid, exp = token_user(verified), token_kid(verified), token_exp(verified)
    assert (user, kid, exp) == ("alice", "key-a", int(NOW + 3600))
    assert result.token_fingerprint == hashlib.sha256(token.encode()).hexdigest()[:12]


async def test_an_identity_from_a_header_is_compared_too(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(
        EVENTS, ANONYMOUS, [("X-User-Id", "bob"), ("X-Sdk-Auth-Token", tokens.good("bob"))]
    )
    assert (await checked(config, request)).status == AuthStatus.VERIFIED


async def test_a_token_for_another_user_is_subject_mismatch(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(EVENTS, registered("alice"), [("X-Sdk-Auth-Token", tokens.good("mallory"))])
    result = await checked(config, request)
    assert result.failure is Reason.SUBJECT_MISMATCH
    assert result.attempt.verified is None
    assert result.attempt.token is not None


async def test_a_token_without_a_named_user_is_still_verified(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(EVENTS, ANONYMOUS, [("X-Sdk-Auth-Token", tokens.good("alice"))])
    result = await checked(config, request)
    assert result.status == AuthStatus.VERIFIED
    assert result.attempt.identity is None


async def test_an_expired_token_fails_and_keeps_the_session_named(
    config: CompiledConfig, tokens: Tokens
) -> None:
    """The session id is kept so the failure is counted against it."""
    request = json_post(
        EVENTS,
        registered("alice"),
        [("X-Sdk-Auth-Token", tokens.expired("alice")), ("X-Session-Id", "s-42")],
    )
    result = await checked(config, request)
    assert result.failure is Reason.EXPIRED
    assert result.attempt.session_id == "s-42"


async def test_two_users_named_in_one_request_is_identity_conflict(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(
        EVENTS,
        registered("alice"),
        [("X-User-Id", "bob"), ("X-Sdk-Auth-Token", tokens.good("alice"))],
    )
    assert (await checked(config, request)).failure is Reason.IDENTITY_CONFLICT


async def test_a_body_that_is_not_json_fails_without_reading_the_token(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = json_post(EVENTS, b'{"a": 1, "a": 2}', [("X-Sdk-Auth-Token", tokens.good())])
    result = await checked(config, request)
    assert result.failure is Reason.DUPLICATE_KEY
    assert result.attempt.token is None


async def test_a_gzip_body_is_checked_and_forwarded_decoded(
    config: CompiledConfig, tokens: Tokens
) -> None:
    document = registered("alice")
    request = json_post(
        EVENTS,
        gzip.compress(document),
        [("Content-Encoding", "gzip"), ("X-Sdk-Auth-Token", tokens.good("alice"))],
    )
    result = await checked(config, request)
    assert result.status == AuthStatus.VERIFIED
    assert result.decoded
    assert result.body == document


async def test_a_project_in_disabled_mode_checks_nothing(config: CompiledConfig) -> None:
    """An unlisted project takes `defaults` (disabled): even a malformed token passes."""
    request = json_post(
        "/track/v2/projects/unlisted/customers/events",
        registered("alice"),
        [("X-Sdk-Auth-Token", "not-a-token")],
    )
    result = await checked(config, request)
    assert result.failure is None
    assert result.status == AuthStatus.DISABLED
    assert result.attempt.token is None


async def test_tokens_and_users_are_read_from_the_query_where_the_route_says(
    config: CompiledConfig, tokens: Tokens
) -> None:
    request = make_request("GET", f"/track/v2/projects/app/pixel?uid=alice&token={tokens.good()}")
    result = await checked(config, request)
    assert result.status == AuthStatus.VERIFIED
    assert result.attempt.identity == "alice"


async def test_two_query_tokens_are_token_duplicate(config: CompiledConfig, tokens: Tokens) -> None:
    token = tokens.good()
    request = make_request(
        "GET", f"/track/v2/projects/app/pixel?uid=alice&token={token}&token={token}"
    )
    assert (await checked(config, request)).failure is Reason.TOKEN_DUPLICATE
