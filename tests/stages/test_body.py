"""The body: `body_at_hand` takes one that came whole with the head; `read_body` waits for the
rest within the limits (413 `body_too_large`, by the declared length before any `100 Continue`
or by what arrives; 400 `body_timeout` when it is late; 400 `http_malformed` when it breaks);
`read_json` gives the body's one JSON reading, or the reason each step refused it."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from gateway.auth.body import NOT_READ
from gateway.config.compiled import CompiledConfig
from gateway.config.routes import Route
from gateway.http.messages import BodyState, Request
from gateway.refusals.reasons import Reason, Rejected
from gateway.stages.body import body_at_hand, read_body, read_json
from tests.stages.support import EVENTS, RecordingChannel, json_post, make_request

DOCUMENT = b'{"customer_ids": {"registered": "alice"}}'


def events_route(config: CompiledConfig) -> Route:
    route, _ = config.router.match("POST", EVENTS)
    return route


def arriving(headers: list[tuple[str, str]], channel: RecordingChannel | None = None) -> Request:
    """A POST whose head has come and whose body has not."""
    return make_request("POST", EVENTS, headers, None, channel=channel)


async def refused_reason(request: Request, config: CompiledConfig) -> Reason:
    with pytest.raises(Rejected) as refused:
        await read_body(request, config.settings.limits)
    return refused.value.reason


# --- body_at_hand ------------------------------------------------------------------------------


def test_a_body_that_came_with_the_head_is_at_hand(config: CompiledConfig) -> None:
    request = json_post(EVENTS, DOCUMENT)
    assert body_at_hand(request, config.settings.limits) == DOCUMENT


def test_a_body_still_arriving_is_not_at_hand(config: CompiledConfig) -> None:
    request = arriving([("Content-Length", "10")])
    assert body_at_hand(request, config.settings.limits) is None


def test_a_body_owed_a_100_continue_is_not_at_hand(config: CompiledConfig) -> None:
    """The client asked to be told to go on: `read_body` sends that, even for an early body."""
    request = make_request(
        "POST", EVENTS, [("Expect", "100-continue"), ("Content-Length", "2")], b"{}"
    )
    assert body_at_hand(request, config.settings.limits) is None


def test_a_whole_body_past_the_configured_limit_is_not_at_hand(config: CompiledConfig) -> None:
    limit = config.settings.limits.max_body_bytes
    body = b"x" * (limit + 1)
    request = make_request(
        "POST", EVENTS, [("Content-Length", str(len(body)))], body, body_limit=limit * 2
    )
    assert body_at_hand(request, config.settings.limits) is None


# --- read_body ---------------------------------------------------------------------------------


async def test_a_body_past_the_configured_limit_is_refused_whatever_the_connection_allowed(
    config: CompiledConfig,
) -> None:
    """Chunked (no declared length) and read under a larger connection limit: the stage's own
    limit still holds."""
    limit = config.settings.limits.max_body_bytes
    request = make_request("POST", EVENTS, [], b"x" * (limit + 1), body_limit=limit * 2)
    assert await refused_reason(request, config) is Reason.BODY_TOO_LARGE


async def test_a_declared_length_past_the_limit_is_refused_before_any_100_continue(
    config: CompiledConfig,
) -> None:
    channel = RecordingChannel()
    too_long = str(config.settings.limits.max_body_bytes + 1)
    request = arriving([("Expect", "100-continue"), ("Content-Length", too_long)], channel)
    assert await refused_reason(request, config) is Reason.BODY_TOO_LARGE
    assert channel.continues == 0


async def test_a_body_arriving_past_the_limit_is_refused(config: CompiledConfig) -> None:
    """No declared length (chunked): the limit is found as the body comes."""
    request = arriving([("Transfer-Encoding", "chunked")])
    too_much = b"x" * (config.settings.limits.max_body_bytes + 1)
    loop = asyncio.get_running_loop()
    loop.call_soon(request.receive, too_much)
    assert await refused_reason(request, config) is Reason.BODY_TOO_LARGE


async def test_a_body_that_comes_later_is_waited_for(config: CompiledConfig) -> None:
    request = arriving([("Content-Length", str(len(DOCUMENT)))])
    loop = asyncio.get_running_loop()
    loop.call_soon(request.receive, DOCUMENT[:10])
    loop.call_soon(request.receive, DOCUMENT[10:])
    loop.call_soon(request.complete)
    assert await read_body(request, config.settings.limits) == DOCUMENT


async def test_the_100_continue_asked_for_is_sent_once_when_the_body_is_read(
    config: CompiledConfig,
) -> None:
    channel = RecordingChannel()
    request = arriving([("Expect", "100-continue"), ("Content-Length", "2")], channel)
    loop = asyncio.get_running_loop()
    loop.call_soon(request.receive, b"{}")
    loop.call_soon(request.complete)
    assert await read_body(request, config.settings.limits) == b"{}"
    assert channel.continues == 1


async def test_a_body_later_than_the_body_timeout_is_refused(config: CompiledConfig) -> None:
    """`limits.body_timeout_seconds` is 0.05 s here; the request is then marked broken, so
    nothing that comes after it is read as a body."""
    request = arriving([("Content-Length", "10")])
    assert await refused_reason(request, config) is Reason.BODY_TIMEOUT
    assert request.body_state is BodyState.BROKEN


async def test_a_body_broken_mid_way_is_http_malformed(config: CompiledConfig) -> None:
    request = arriving([("Content-Length", "10")])
    loop = asyncio.get_running_loop()
    loop.call_soon(request.receive, b"12345")
    loop.call_soon(request.broken)
    assert await refused_reason(request, config) is Reason.HTTP_MALFORMED


async def test_a_body_broken_before_it_is_read_is_http_malformed(config: CompiledConfig) -> None:
    request = arriving([("Content-Length", "10")])
    request.broken()
    assert await refused_reason(request, config) is Reason.HTTP_MALFORMED


# --- read_json ---------------------------------------------------------------------------------


async def test_a_json_body_is_read_once(config: CompiledConfig) -> None:
    request = json_post(EVENTS, DOCUMENT)
    reading = await read_json(request, events_route(config), DOCUMENT, config.settings.limits)
    assert reading.document == {"customer_ids": {"registered": "alice"}}
    assert reading.forwarded == DOCUMENT
    assert not reading.decoded
    assert reading.encoding_refused is None
    assert reading.parse_refused is None


async def test_a_gzip_body_is_decoded_and_walked_to_the_routes_paths(
    config: CompiledConfig,
) -> None:
    """A compressed body is read on a worker thread, which also walks it to the route's JSON
    paths; what is forwarded is the decoded body."""
    compressed = gzip.compress(DOCUMENT)
    request = json_post(EVENTS, compressed, [("Content-Encoding", "gzip")])
    route = events_route(config)
    reading = await read_json(request, route, compressed, config.settings.limits)
    assert reading.decoded
    assert reading.forwarded == DOCUMENT
    assert reading.walked == {("customer_ids", "registered"): ["alice"]}


async def test_an_unknown_content_coding_is_refused_and_the_body_kept(
    config: CompiledConfig,
) -> None:
    request = json_post(EVENTS, b"\x00\x01", [("Content-Encoding", "br")])
    reading = await read_json(request, events_route(config), b"\x00\x01", config.settings.limits)
    assert reading.encoding_refused is Reason.ENCODING_UNSUPPORTED
    assert reading.forwarded == b"\x00\x01"
    assert reading.document is NOT_READ


async def test_a_body_decoding_past_its_limit_is_refused(config: CompiledConfig) -> None:
    limit = config.settings.limits.max_decompressed_bytes
    bomb = gzip.compress(b'{"pad": "' + b"a" * limit + b'"}')
    request = json_post(EVENTS, bomb, [("Content-Encoding", "gzip")])
    reading = await read_json(request, events_route(config), bomb, config.settings.limits)
    assert reading.encoding_refused is Reason.DECOMPRESSED_TOO_LARGE


async def test_a_form_body_on_a_json_route_is_refused(config: CompiledConfig) -> None:
    body = b"customer=alice"
    request = make_request(
        "POST",
        EVENTS,
        [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", "14")],
        body,
    )
    reading = await read_json(request, events_route(config), body, config.settings.limits)
    assert reading.encoding_refused is Reason.MEDIA_TYPE_FORM


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b'{"a": 1, "a": 2}', Reason.DUPLICATE_KEY, id="duplicate_key"),
        pytest.param(b'{"a": ', Reason.JSON_INVALID, id="truncated"),
    ],
)
async def test_a_body_that_is_not_one_json_document_is_refused(
    config: CompiledConfig, body: bytes, reason: Reason
) -> None:
    request = json_post(EVENTS, body)
    reading = await read_json(request, events_route(config), body, config.settings.limits)
    assert reading.encoding_refused is None
    assert reading.parse_refused is reason
