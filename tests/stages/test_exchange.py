"""`request_id`: the client's `X-Request-Id` is echoed when it can be echoed unescaped (it is
written into headers, JSON bodies and log lines as it is), else the gateway makes one; and the
`Exchange` a request starts from."""

from __future__ import annotations

import re

import pytest

from gateway.stages.exchange import Exchange, request_id
from tests.stages.support import EVENTS, make_request

OURS = re.compile(r"[0-9a-f]{24}")  # 6 random bytes per process, then a 12-digit counter


def id_for(*headers: tuple[str, str]) -> str:
    return request_id(make_request("POST", EVENTS, list(headers)))


@pytest.mark.parametrize(
    "incoming",
    [
        pytest.param("abc-123", id="plain"),
        pytest.param("trace.span:01_A-z", id="every_punctuation_allowed"),
        pytest.param("x" * 128, id="longest"),
    ],
)
def test_a_safe_client_request_id_is_echoed(incoming: str) -> None:
    assert id_for(("X-Request-Id", incoming)) == incoming


@pytest.mark.parametrize(
    "incoming",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 129, id="too_long"),
        pytest.param("a b", id="space"),
        pytest.param('a"b', id="quote"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("id\u00e9", id="non_ascii"),
        pytest.param("a/b", id="slash"),
    ],
)
def test_an_unsafe_client_request_id_is_replaced(incoming: str) -> None:
    made = id_for(("X-Request-Id", incoming))
    assert made != incoming
    assert OURS.fullmatch(made)


def test_a_request_without_one_gets_a_new_id_each_time() -> None:
    first, second = id_for(), id_for()
    assert OURS.fullmatch(first)
    assert OURS.fullmatch(second)
    assert first != second


def test_the_header_is_read_under_any_spelling_of_its_name() -> None:
    assert id_for(("x_request_id", "abc")) == "abc"


def test_the_first_of_two_request_ids_is_the_one_read() -> None:
    assert id_for(("X-Request-Id", "first"), ("X-Request-Id", "second")) == "first"


def test_an_exchange_starts_parsed_unrouted_and_not_yet_authenticating() -> None:
    exchange = Exchange("req-1")
    assert exchange.parsed
    assert not exchange.authenticating
    assert exchange.mode == "disabled"
    assert (exchange.route, exchange.project, exchange.decision, exchange.reason) == (
        None,
        None,
        None,
        None,
    )
