"""`read_target`: the request target in its one accepted form (400 `path_invalid` otherwise),
and no body on a method whose body an upstream may never read (400 `body_not_allowed`): such
a body would be read as the next request on the upstream connection, one nobody checked."""

from __future__ import annotations

import pytest

from gateway.auth.target import Target
from gateway.refusals.reasons import Reason, Rejected
from gateway.stages.target import read_target
from tests.stages.support import EVENTS, make_request


def test_a_path_and_its_query_are_read_raw() -> None:
    target = read_target(make_request("POST", f"{EVENTS}?batch=1&x=%41"))
    assert target == Target(EVENTS, "batch=1&x=%41")


def test_a_target_without_a_question_mark_has_no_query() -> None:
    assert read_target(make_request("GET", "/v2/sdkconfig")).query is None


def test_an_empty_query_is_kept_apart_from_none() -> None:
    assert read_target(make_request("GET", "/v2/sdkconfig?")).query == ""


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/track/../admin", id="dot_dot_segment"),
        pytest.param("/track/./v2", id="dot_segment"),
        pytest.param("/track//v2", id="empty_segment"),
        pytest.param("/track/%2e%2e/admin", id="percent_encoded_path"),
        pytest.param("track/v2", id="not_absolute"),
        pytest.param("http://upstream.example/track", id="absolute_form"),
        pytest.param("/track/v2?a=<b>", id="query_with_angle_brackets"),
        pytest.param("/track/v2?a=b#frag", id="fragment"),
    ],
)
def test_a_target_with_more_than_one_reading_is_path_invalid(raw: str) -> None:
    with pytest.raises(Rejected) as refused:
        read_target(make_request("POST", raw))
    assert refused.value.reason is Reason.PATH_INVALID


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS", "TRACE"])
def test_a_bodyless_method_with_a_content_length_is_refused(method: str) -> None:
    request = make_request(method, "/v2/sdkconfig", [("Content-Length", "5")], b"hello")
    with pytest.raises(Rejected) as refused:
        read_target(request)
    assert refused.value.reason is Reason.BODY_NOT_ALLOWED


def test_a_get_with_transfer_encoding_is_refused() -> None:
    request = make_request("GET", "/v2/sdkconfig", [("Transfer-Encoding", "chunked")], None)
    with pytest.raises(Rejected) as refused:
        read_target(request)
    assert refused.value.reason is Reason.BODY_NOT_ALLOWED


def test_a_get_with_a_zero_content_length_carries_no_body_and_passes() -> None:
    request = make_request("GET", "/v2/sdkconfig", [("Content-Length", "0")])
    assert read_target(request) == Target("/v2/sdkconfig", None)


def test_a_post_may_carry_a_body() -> None:
    request = make_request("POST", EVENTS, [("Content-Length", "2")], b"{}")
    assert read_target(request).path == EVENTS


def test_a_bad_path_is_reported_before_a_forbidden_body() -> None:
    """The target is read first: a GET with a body and a bad path is `path_invalid`."""
    request = make_request("GET", "/a/../b", [("Content-Length", "1")], b"x")
    with pytest.raises(Rejected) as refused:
        read_target(request)
    assert refused.value.reason is Reason.PATH_INVALID
