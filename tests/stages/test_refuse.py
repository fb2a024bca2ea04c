"""`refusal`: the gateway's own answer to a refused request, from the reason table: status,
`WWW-Authenticate`, `Retry-After` where the reason has a fixed one, whether the connection
closes, the route's error format, and the headers every answer carries (request id, CORS for a
listed origin, `Date`). The 429 of a limited session names the token failure that caused it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config.compiled import CompiledConfig
from gateway.http.messages import Response
from gateway.refusals.reasons import Reason
from gateway.stages.exchange import Exchange
from gateway.stages.refuse import refusal
from tests.stages.support import EVENTS, ORIGIN


def headers_of(response: Response) -> dict[str, str]:
    """The answer's header lines by lower-case name; each name must appear once."""
    found: dict[str, str] = {}
    for line in response.headers:
        name, _, value = line.decode().partition(":")
        assert name.lower() not in found, f"{name} twice"
        found[name.lower()] = value.strip()
    return found


def body_of(response: Response) -> Any:
    return json.loads(response.body)


@pytest.mark.parametrize(
    ("reason", "status", "retry_after"),
    [
        pytest.param(Reason.UPSTREAM_CONNECT, 502, "1", id="upstream_connect"),
        pytest.param(Reason.UPSTREAM_BROKEN, 502, "1", id="upstream_broken"),
        pytest.param(Reason.KEYS_UNAVAILABLE, 503, "5", id="keys_unavailable"),
        pytest.param(Reason.UPSTREAM_TIMEOUT, 504, None, id="upstream_timeout"),
        pytest.param(Reason.TOKEN_MISSING, 401, None, id="token_missing"),
    ],
)
def test_retry_after_comes_from_the_reason_table(
    reason: Reason, status: int, retry_after: str | None
) -> None:
    response = refusal(reason, Exchange("req-1"))
    assert response.status == status
    assert headers_of(response).get("retry-after") == retry_after


def test_the_answer_names_the_request_and_the_reason() -> None:
    exchange = Exchange("req-1")
    response = refusal(Reason.EXPIRED, exchange)
    headers = headers_of(response)
    assert response.status == 401
    assert headers["x-request-id"] == "req-1"
    assert headers["content-type"] == "application/json"
    assert headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert "date" in headers
    assert body_of(response) == {
        "token_expired": True,
        "error": {
            "code": "TOKEN_EXPIRED",
            "reason": "expired",
            "message": "The SDK authentication token has expired.",
            "request_id": "req-1",
        },
    }
    assert exchange.reason is Reason.EXPIRED


@pytest.mark.parametrize(
    "reason",
    [
        Reason.BODY_TOO_LARGE,
        Reason.BODY_TIMEOUT,
        Reason.BODY_NOT_ALLOWED,
        Reason.HTTP_MALFORMED,
        Reason.SHUTTING_DOWN,
    ],
)
def test_a_reason_whose_request_was_not_read_whole_closes_the_connection(
    reason: Reason,
) -> None:
    assert refusal(reason, Exchange("req-1")).close


def test_a_body_too_large_is_413_and_closes() -> None:
    response = refusal(Reason.BODY_TOO_LARGE, Exchange("req-1"))
    assert (response.status, response.close) == (413, True)


def test_a_token_failure_keeps_the_connection_open() -> None:
    assert not refusal(Reason.SIGNATURE_INVALID, Exchange("req-1")).close


def test_a_limited_session_is_429_naming_its_cause() -> None:
    exchange = Exchange("req-1")
    response = refusal(Reason.SESSION_LIMITED, exchange, cause=Reason.EXPIRED, retry_after=42)
    headers = headers_of(response)
    assert response.status == 429
    assert headers["retry-after"] == "42"
    assert "www-authenticate" not in headers  # new credentials will not help before then
    error = body_of(response)["error"]
    assert error["code"] == "AUTH_FAILURE_LIMIT"
    assert error["cause"] == "TOKEN_EXPIRED"
    assert error["reason"] == "expired"
    assert exchange.reason is Reason.SESSION_LIMITED
    assert not response.close


def test_a_method_not_allowed_lists_the_methods_allowed() -> None:
    response = refusal(Reason.METHOD_NOT_ALLOWED, Exchange("req-1"), allow="GET, POST")
    assert response.status == 405
    assert headers_of(response)["allow"] == "GET, POST"


def test_an_answer_to_a_listed_origin_carries_cors_headers() -> None:
    exchange = Exchange("req-1")
    exchange.cors_headers = {"Access-Control-Allow-Origin": ORIGIN}
    response = refusal(Reason.TOKEN_MISSING, exchange)
    assert headers_of(response)["access-control-allow-origin"] == ORIGIN


def test_a_bloomreach_route_answers_a_missing_token_403(config: CompiledConfig) -> None:
    """The Bloomreach SDKs report TOKEN_NOT_PROVIDED only for a 403."""
    route, _ = config.router.match("GET", "/track/v2/projects/app/pixel")
    response = refusal(Reason.TOKEN_MISSING, Exchange("req-1", route=route))
    assert response.status == 403
    body = body_of(response)
    assert (body["success"], body["code"], body["reason"]) == (
        False,
        "TOKEN_NOT_PROVIDED",
        "token_missing",
    )


def test_a_standard_route_answers_a_missing_token_401(config: CompiledConfig) -> None:
    route, _ = config.router.match("POST", EVENTS)
    response = refusal(Reason.TOKEN_MISSING, Exchange("req-1", route=route))
    assert response.status == 401
    assert body_of(response)["error"]["code"] == "TOKEN_NOT_PROVIDED"
