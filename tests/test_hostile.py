"""Hostile requests, one technique per test, through real HTTP to a real recording upstream.

"One reading only": the gateway must never authorise one reading of a request and
forward another. Each test sends one trick and checks the contract's answer *and* what reached
the upstream (usually nothing). What a well-behaved client cannot send goes over a raw socket.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.tools.sample_upstream import make_sample_upstream
from tests.conftest import (
    GatewayFactory,
    RawResponse,
    RunningGateway,
    Tokens,
    Upstream,
    raw_request,
)

EVENTS = "/track/v2/projects/app/customers/events"
ANONYMOUS = b'{"customer_ids": {"cookie": "c-123"}, "event_type": "view"}'
SMALL_LIMIT = 1024  # limits.max_body_bytes for the size tests: small, so they stay fast


def identified(user: str = "alice") -> bytes:
    return json.dumps({"customer_ids": {"registered": user}, "event_type": "purchase"}).encode()


# --- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive for aiohttp answers, lower-case for raw ones
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    body: bytes,
    headers: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    path: str = EVENTS,
    content_type: str | None = "application/json",
) -> Answer:
    all_headers: CIMultiDict[str] = CIMultiDict()
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    items = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in items:
        all_headers.add(name, value)
    url = URL(gateway.url + path, encoded=True)  # sent exactly as written, never requoted
    async with http.post(url, data=body, headers=all_headers) as response:
        return Answer(response.status, response.headers, await response.read())


def raw_http(
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    method: str = "POST",
    content_length: bool = True,
) -> bytes:
    """One HTTP/1.1 request as bytes; `Content-Length` is added unless told otherwise."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *(f"{n}: {v}" for n, v in headers)]
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(body: bytes, size: int = 256) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def first_status_line(port: int, data: bytes, wait_seconds: float = 5) -> str:
    """The first status line the gateway sends back (a `100 Continue` would come first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_seconds):
            line = await reader.readline()
        return line.decode("latin-1").rstrip("\r\n")
    finally:
        writer.close()
        await writer.wait_closed()


def assert_refused(answer: Answer | RawResponse, status: int, code: str, reason: str) -> None:
    """The gateway's JSON error, with its request id in the header and the body."""
    headers = {k.lower(): v for k, v in answer.headers.items()}
    assert answer.status == status, answer.body
    assert headers["content-type"] == "application/json"
    body = json.loads(answer.body)
    assert list(body) == ["token_expired", "error"]
    assert body["token_expired"] is False
    assert body["error"]["code"] == code
    assert body["error"]["reason"] == reason
    assert headers["x-request-id"] == body["error"]["request_id"]


def assert_bad_request(answer: Answer | RawResponse, reason: str) -> None:
    assert_refused(answer, 400, "BAD_REQUEST", reason)


def monitor(config: dict[str, Any]) -> None:
    config["projects"]["app"]["mode"] = "monitor"


# --- paths: one reading, the path matched is the path forwarded --------------------------------

HOSTILE_PATHS = [
    pytest.param("/track/v2/projects/%61pp/customers/events", id="percent_encoded_letter"),
    pytest.param(
        "/track/v2/projects/app/customers/%2e%2e/customers/events", id="percent_encoded_dot_dot"
    ),
    pytest.param("/track/v2/projects/app%2fcustomers/events", id="percent_encoded_slash"),
    pytest.param("/track/v2/projects/app/customers/events;jsessionid=1", id="semicolon_params"),
    pytest.param("/track/v2/projects/app;x=1/customers/events", id="semicolon_in_segment"),
    pytest.param("/track/v2/projects/app\\customers/events", id="backslash"),
    pytest.param("/track/v2//projects/app/customers/events", id="double_slash"),
    pytest.param("//track/v2/projects/app/customers/events", id="leading_double_slash"),
    pytest.param("/track/v2/projects/./app/customers/events", id="dot_segment"),
    pytest.param("/track/v2/projects/other/../app/customers/events", id="dot_dot_segment"),
    pytest.param("/track/v2/projects/app/customers/events/.", id="trailing_dot"),
    pytest.param("http://127.0.0.1/track/v2/projects/app/customers/events", id="absolute_form"),
    pytest.param("/track/v2/projects/app/customers/events#frag", id="fragment"),
    pytest.param("/track/v2/projects/app/customers/events?a=1#frag", id="fragment_after_query"),
    pytest.param("/track/v2/projects/app/customers/events?q=<x>", id="query_unsafe_chars"),
]


def request_with_target(target: bytes) -> bytes:
    head = b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(ANONYMOUS), ANONYMOUS)


@pytest.mark.parametrize("target", HOSTILE_PATHS)
async def test_hostile_path_is_path_invalid(
    gateway: RunningGateway, upstream: Upstream, target: str
) -> None:
    answer = await raw_request(gateway.port, request_with_target(target.encode("ascii")))
    assert_bad_request(answer, "path_invalid")
    assert upstream.received == []


NON_ASCII_PATHS = [
    pytest.param("/track/v2/projects/äpp/customers/events".encode(), id="utf8"),
    pytest.param(b"/track/v2/projects/app\xff/customers/events", id="latin1_byte"),
    pytest.param(b"/track/v2/projects/app\x01/customers/events", id="control_byte"),
    pytest.param(b"/track/v2/projects/app\x7f/customers/events", id="delete_byte"),
]


@pytest.mark.parametrize("target", NON_ASCII_PATHS)
async def test_non_ascii_or_control_path_byte_is_refused(
    gateway: RunningGateway, upstream: Upstream, target: bytes
) -> None:
    answer = await raw_request(gateway.port, request_with_target(target))
    # aiohttp's HTTP parser (llhttp) already refuses these bytes in a request target, so the
    # contract's 400 comes from the HTTP parser; a lenient one would leave it to the router.
    reason = json.loads(answer.body)["error"]["reason"]
    assert reason in ("http_malformed", "path_invalid")
    assert_bad_request(answer, reason)
    assert upstream.received == []


async def test_path_forwarded_equals_path_matched(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    for target in (
        EVENTS + "?a=1&b=%2F&c=+x&flag",
        "/track/v2/projects/my-app_1.2~x/customers/events",
        "/track/v2/projects/.../customers/events",
    ):
        answer = await post(http, gateway, ANONYMOUS, path=target)
        assert answer.status == 200, answer.body
        assert upstream.received[-1].path_qs == target
    assert len(upstream.received) == 3


# --- JSON: one strict document ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"event_type": "a", "event_type": "b"}', id="top_level"),
        pytest.param(
            b'{"customer_ids": {"registered": "alice", "registered": "mallory"}}',
            id="identity_object",
        ),
        pytest.param(
            b'{"customer_ids": {"cookie": "c"}, "customer_ids": {}}', id="identity_parent"
        ),
        pytest.param(b'{"props": {"items": [{"sku": 1, "sku": 2}]}}', id="inside_array"),
        pytest.param(b'{"a": {"b": {"c": {"d": {"e": 1, "e": 1}}}}}', id="deep_same_value"),
    ],
)
async def test_duplicate_json_key_is_duplicate_key(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, body: bytes
) -> None:
    assert_bad_request(await post(http, gateway, body), "duplicate_key")
    assert upstream.received == []


async def test_duplicate_json_key_is_refused_whatever_the_content_type(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    body = b'{"customer_ids": {"registered": "alice", "registered": "mallory"}}'
    for content_type in ("text/plain", None):
        answer = await post(http, gateway, body, content_type=content_type)
        assert_bad_request(answer, "duplicate_key")
    assert upstream.received == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"customer_ids": {"registered": "alice", "Registered": "mallory"}}', id="leaf"
        ),
        pytest.param(
            b'{"customer_ids": {"registered": "alice"}, "CUSTOMER_IDS": {"registered": "m"}}',
            id="parent",
        ),
    ],
)
async def test_case_variant_key_on_identity_path(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    body: bytes,
) -> None:
    answer = await post(http, gateway, body, {"X-Sdk-Auth-Token": tokens.good("alice")})
    assert_bad_request(answer, "case_variant_key")
    assert upstream.received == []


async def test_case_variant_key_off_the_identity_path_is_accepted(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    body = b'{"customer_ids": {"cookie": "c"}, "event_type": "a", "Event_Type": "b"}'
    answer = await post(http, gateway, body)
    assert answer.status == 200
    assert upstream.received[-1].body == body.decode()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"customer_ids": {"cookie": "c"}, "v": NaN}', id="nan"),
        pytest.param(b'{"customer_ids": {"cookie": "c"}, "v": Infinity}', id="infinity"),
        pytest.param(b'{"customer_ids": {"cookie": "c"}, "v": -Infinity}', id="minus_infinity"),
        pytest.param(b'{"customer_ids": {"cookie": "c"}, "v": 1e999}', id="float_overflow"),
        pytest.param(b"\xef\xbb\xbf" + ANONYMOUS, id="utf8_bom"),
        pytest.param(b'{"customer_ids": {"cookie": "c\xff"}}', id="invalid_utf8"),
        pytest.param(b'{"customer_ids": {"cookie": "\xed\xa0\x80"}}', id="utf8_surrogate"),
        pytest.param(ANONYMOUS.decode().encode("utf-16"), id="utf16"),
        pytest.param(ANONYMOUS + b" garbage", id="trailing_garbage"),
        pytest.param(ANONYMOUS + ANONYMOUS, id="two_documents"),
        pytest.param(ANONYMOUS[:-1], id="truncated"),
        pytest.param(b"{'customer_ids': {}}", id="single_quotes"),
        # Readers repair a lone surrogate escape differently (Go: U+FFFD; Python keeps it).
        pytest.param(b'{"customer_ids": {"registered": "alice\\ud800"}}', id="lone_surrogate"),
        pytest.param(b'{"customer_ids": {"cookie": "c"}, "k\\udc00": 1}', id="surrogate_key"),
    ],
)
async def test_malformed_json_is_json_invalid(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, body: bytes
) -> None:
    assert_bad_request(await post(http, gateway, body), "json_invalid")
    assert upstream.received == []


# --- identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(42, id="number"),
        pytest.param("", id="empty_string"),
        pytest.param({"value": "alice"}, id="object"),
        pytest.param(["alice"], id="array"),
        pytest.param(True, id="boolean"),
        pytest.param("ali\u0000ce", id="nul_char"),
        pytest.param("alice\n", id="newline"),
        pytest.param("alice\u0085", id="c1_control"),
    ],
)
async def test_malformed_identity_is_identity_invalid(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    value: Any,
) -> None:
    body = json.dumps({"customer_ids": {"registered": value}}).encode()
    answer = await post(http, gateway, body, {"X-Sdk-Auth-Token": tokens.good()})
    assert_bad_request(answer, "identity_invalid")
    assert upstream.received == []


async def test_identity_in_header_and_body_disagreeing_is_identity_conflict(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    headers = {"X-User-Id": "mallory", "X-Sdk-Auth-Token": tokens.good("mallory")}
    answer = await post(http, gateway, identified("alice"), headers)
    assert_bad_request(answer, "identity_conflict")
    assert upstream.received == []


@pytest.mark.parametrize("name", ["X-User-Id", "X-Session-Id"])
async def test_configured_header_sent_twice_is_header_duplicate(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, name: str
) -> None:
    headers = [
        ("Content-Type", "application/json"),
        (name, "alice"),
        (name.lower(), "alice"),  # the same value twice is still two readings
        ("X-Sdk-Auth-Token", tokens.good()),
    ]
    answer = await raw_request(gateway.port, raw_http(EVENTS, headers, ANONYMOUS))
    assert_bad_request(answer, "header_duplicate")
    assert upstream.received == []


async def test_identity_header_sent_with_dash_and_underscore_is_header_duplicate(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    # CGI-style servers read `X_User_Id` as `X-User-Id`: both spellings at once is two values.
    headers = [
        ("Content-Type", "application/json"),
        ("X-User-Id", "alice"),
        ("X_User_Id", "mallory"),
        ("X-Sdk-Auth-Token", tokens.good()),
    ]
    answer = await raw_request(gateway.port, raw_http(EVENTS, headers, ANONYMOUS))
    assert_bad_request(answer, "header_duplicate")
    assert upstream.received == []


def with_query_identity_route(config: dict[str, Any]) -> None:
    config["routes"].insert(
        0,
        {
            "name": "track-query",
            "methods": ["POST"],
            "path": "/track/v2/projects/{project}/query",
            "auth": ["sdk_jwt"],
            "identity": [{"query": "uid"}],
        },
    )


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param("uid=alice&uid=alice", "query_duplicate", id="same_name_twice"),
        pytest.param("uid=alice&u%69d=mallory", "query_duplicate", id="percent_encoded_name"),
        pytest.param("uid=alice&uid=", "query_duplicate", id="second_one_empty"),
        pytest.param("uid=alice;uid=mallory", "query_invalid", id="semicolon_separator"),
        pytest.param("uid=%ff", "query_invalid", id="invalid_utf8"),
    ],
)
async def test_query_identity_read_two_ways_is_refused(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    upstream: Upstream,
    tokens: Tokens,
    query: str,
    reason: str,
) -> None:
    gateway = await make_gateway(with_query_identity_route)
    headers = {"X-Sdk-Auth-Token": tokens.good("alice")}
    answer = await post(http, gateway, b"", headers, path=f"/track/v2/projects/app/query?{query}")
    assert_bad_request(answer, reason)
    assert upstream.received == []
    # The same route with one reading passes, so the refusal above is the duplicate's.
    answer = await post(http, gateway, b"", headers, path="/track/v2/projects/app/query?uid=alice")
    assert answer.status == 200
    assert upstream.last_headers()["x-authenticated-user"] == "alice"


@pytest.mark.parametrize(
    "session_id",
    [pytest.param("s" * 129, id="ascii_129"), pytest.param("é" * 65, id="utf8_130_bytes")],
)
async def test_session_id_over_128_bytes_is_session_id_too_long(
    make_gateway: GatewayFactory, upstream: Upstream, session_id: str
) -> None:
    gateway = await make_gateway()
    ok = [("Content-Type", "application/json"), ("X-Session-Id", "s" * 128)]
    assert (await raw_request(gateway.port, raw_http(EVENTS, ok, ANONYMOUS))).status == 200
    too_long = [("Content-Type", "application/json"), ("X-Session-Id", session_id)]
    data = raw_http(EVENTS, too_long, ANONYMOUS)
    assert_bad_request(await raw_request(gateway.port, data), "session_id_too_long")
    assert len(upstream.received) == 1


# --- media types and encodings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        pytest.param("application/x-www-form-urlencoded", "media_type_unsupported", id="form"),
        pytest.param("multipart/form-data; boundary=x", "media_type_unsupported", id="multipart"),
        pytest.param("MULTIPART/mixed; boundary=x", "media_type_unsupported", id="multipart_caps"),
        pytest.param("application/json; charset=latin-1", "charset_unsupported", id="latin1"),
        pytest.param('application/json; charset="utf-16"', "charset_unsupported", id="utf16"),
    ],
)
async def test_unreadable_media_type_is_415(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    content_type: str,
    reason: str,
) -> None:
    answer = await post(http, gateway, ANONYMOUS, content_type=content_type)
    assert_refused(answer, 415, "UNSUPPORTED_MEDIA_TYPE", reason)
    assert upstream.received == []


@pytest.mark.parametrize(
    "encodings",
    [
        pytest.param(["br"], id="brotli"),
        pytest.param(["compress"], id="compress"),
        pytest.param(["gzip, gzip"], id="stacked_in_one_header"),
        pytest.param(["gzip", "deflate"], id="stacked_in_two_headers"),
        pytest.param(["identity, gzip"], id="identity_then_gzip"),
        pytest.param(["gzip, identity"], id="gzip_then_identity"),
        pytest.param(["identity", "identity"], id="identity_twice"),
    ],
)
async def test_unknown_or_stacked_content_encoding_is_415(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    encodings: list[str],
) -> None:
    body = gzip.compress(gzip.compress(ANONYMOUS))
    headers = [("Content-Encoding", e) for e in encodings]
    answer = await post(http, gateway, body, headers)
    assert_refused(answer, 415, "UNSUPPORTED_MEDIA_TYPE", "encoding_unsupported")
    assert upstream.received == []


@pytest.mark.parametrize(
    ("coding", "compress"),
    [
        pytest.param("gzip", gzip.compress, id="gzip"),
        pytest.param("deflate", zlib.compress, id="zlib_deflate"),
    ],
)
async def test_compressed_body_is_decoded_authorised_and_forwarded_decoded(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    coding: str,
    compress: Any,
) -> None:
    plain = identified("alice")
    # The decoded identity is what is authorised: a token for someone else is refused ...
    mismatch = {"Content-Encoding": coding, "X-Sdk-Auth-Token": tokens.good("mallory")}
    answer = await post(http, gateway, compress(plain), mismatch)
    assert_refused(answer, 401, "TOKEN_REJECTED", "subject_mismatch")
    assert upstream.received == []
    # ... and the decoded bytes are what is forwarded, without Content-Encoding.
    matching = {"Content-Encoding": coding, "X-Sdk-Auth-Token": tokens.good("alice")}
    answer = await post(http, gateway, compress(plain), matching)
    assert answer.status == 200, answer.body
    forwarded = upstream.last_headers()
    assert upstream.received[-1].body == plain.decode()
    assert "content-encoding" not in forwarded
    assert forwarded["content-length"] == str(len(plain))
    assert forwarded["x-auth-status"] == "verified"
    assert forwarded["x-authenticated-user"] == "alice"


async def test_gzip_bomb_is_413(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(limits={"max_decompressed_bytes": 64 * 1024})
    bomb = gzip.compress(b'{"pad": "' + b"0" * (4 * 1024 * 1024) + b'"}')
    assert len(bomb) < 64 * 1024  # small on the wire, large once decoded
    answer = await post(http, gateway, bomb, {"Content-Encoding": "gzip"})
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "decompressed_too_large")
    assert upstream.received == []


async def test_decoded_body_is_limited_by_max_decompressed_bytes_not_max_body_bytes(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    limits = {"max_body_bytes": 64 * 1024, "max_decompressed_bytes": 1024 * 1024}
    gateway = await make_gateway(limits=limits)
    plain = b'{"customer_ids": {"cookie": "c"}, "pad": "' + b"0" * (512 * 1024) + b'"}'
    answer = await post(http, gateway, gzip.compress(plain), {"Content-Encoding": "gzip"})
    assert answer.status == 200, answer.body  # small on the wire, within the decoded limit
    assert upstream.received[-1].body == plain.decode()
    assert upstream.last_headers()["content-length"] == str(len(plain))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(gzip.compress(ANONYMOUS) + b"garbage", id="trailing_garbage"),
        pytest.param(gzip.compress(ANONYMOUS) + gzip.compress(b" "), id="two_members"),
        pytest.param(gzip.compress(ANONYMOUS)[:-6], id="truncated"),
        pytest.param(b"\x1f\x8b not gzip at all", id="not_gzip"),
    ],
)
async def test_ambiguous_gzip_stream_is_400(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, body: bytes
) -> None:
    answer = await post(http, gateway, body, {"Content-Encoding": "gzip"})
    assert_bad_request(answer, "encoding_invalid")
    assert upstream.received == []


# --- sizes ---------------------------------------------------------------------------------------


async def test_content_length_over_limit_is_413(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(limits={"max_body_bytes": SMALL_LIMIT})
    body = b" " * (SMALL_LIMIT + 1)
    answer = await raw_request(gateway.port, raw_http(EVENTS, [], body))
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "body_too_large")
    assert upstream.received == []


async def test_content_length_over_limit_with_expect_100_continue_is_413_before_continue(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(limits={"max_body_bytes": SMALL_LIMIT})
    head = [("Expect", "100-continue"), ("Content-Length", str(SMALL_LIMIT + 1))]
    data = raw_http(EVENTS, head, content_length=False)  # the body waits for `100 Continue`
    assert (await first_status_line(gateway.port, data)).startswith("HTTP/1.1 413 ")
    answer = await raw_request(gateway.port, data)
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "body_too_large")
    assert upstream.received == []
    # Within the limit, the same request is told to continue.
    small = [("Expect", "100-continue"), ("Content-Length", str(len(ANONYMOUS)))]
    data = raw_http(EVENTS, small, content_length=False)
    assert await first_status_line(gateway.port, data) == "HTTP/1.1 100 Continue"


async def test_chunked_body_over_limit_is_413(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(limits={"max_body_bytes": SMALL_LIMIT})
    headers = [("Transfer-Encoding", "chunked")]
    data = raw_http(EVENTS, headers, chunked(b" " * (SMALL_LIMIT * 2)), content_length=False)
    answer = await raw_request(gateway.port, data)
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "body_too_large")
    assert upstream.received == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\n{}\r\n0\r\n\r\n", id="chunk_size_not_hex"),
        pytest.param(b"2\r\n{}XX0\r\n\r\n", id="chunk_without_crlf"),
        pytest.param(b"-2\r\n{}\r\n0\r\n\r\n", id="negative_chunk_size"),
    ],
)
async def test_malformed_chunked_body_is_400_json(
    gateway: RunningGateway, upstream: Upstream, body: bytes
) -> None:
    headers = [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]
    answer = await raw_request(gateway.port, raw_http(EVENTS, headers, body, content_length=False))
    assert_bad_request(answer, "http_malformed")
    assert upstream.received == []


async def test_body_cut_short_by_the_client_is_a_client_error_in_the_access_log(
    gateway: RunningGateway, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", "1000")]
    data = raw_http(EVENTS, headers, ANONYMOUS, content_length=False)
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(data)
    await writer.drain()
    writer.close()  # the client goes away 1000 - len(ANONYMOUS) bytes short
    await writer.wait_closed()
    # One access-log line per request, and a client's failure is not the gateway's:
    # a 4xx in the log, no error logged with a traceback.
    records = await gateway.access_log()
    assert len(records) == 1, "no access-log line for the request"
    assert records[0]["route"] == "track-events"
    assert 400 <= records[0]["status"] < 500
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert upstream.received == []


# --- request smuggling and unparsable requests ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            raw_http(
                EVENTS,
                [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
                b"0\r\n\r\n",
                content_length=False,
            ),
            id="content_length_and_transfer_encoding",
        ),
        pytest.param(
            raw_http(
                EVENTS,
                [("Transfer-Encoding", "chunked, identity")],
                chunked(ANONYMOUS),
                content_length=False,
            ),
            id="transfer_encoding_chunked_identity",
        ),
        pytest.param(
            raw_http(
                EVENTS,
                [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
                chunked(ANONYMOUS),
                content_length=False,
            ),
            id="transfer_encoding_twice",
        ),
        pytest.param(
            raw_http(
                EVENTS,
                [("Content-Length", "2"), ("Content-Length", "3")],
                b"{}",
                content_length=False,
            ),
            id="two_content_lengths",
        ),
        pytest.param(
            raw_http(EVENTS, [("X-User-Id", "alice\r\n mallory")], ANONYMOUS),
            id="obs_fold_continuation",
        ),
        pytest.param(
            raw_http(EVENTS, [("X-User-Id ", "alice")], ANONYMOUS),
            id="space_before_colon",
        ),
        pytest.param(b"GARBAGE\r\n\r\n", id="garbage_request_line"),
        pytest.param(b"POST /track HTTP/9.9\r\nHost: x\r\n\r\n", id="unknown_http_version"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), id="tls_hello"),
    ],
)
async def test_unparsable_request_is_400_json(
    gateway: RunningGateway, upstream: Upstream, data: bytes
) -> None:
    answer = await raw_request(gateway.port, data)
    assert_bad_request(answer, "http_malformed")
    assert answer.headers["x-request-id"]
    assert upstream.received == []


# --- request ids ---------------------------------------------------------------------------------


async def test_every_gateway_error_has_a_request_id(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(limits={"max_body_bytes": SMALL_LIMIT})
    answers: list[Answer | RawResponse] = [
        await post(http, gateway, ANONYMOUS, path="/nowhere"),  # 404
        await post(http, gateway, ANONYMOUS, path="/v2/sdkconfig"),  # 405
        await post(http, gateway, identified()),  # 401
        await post(http, gateway, b" " * (SMALL_LIMIT + 1)),  # 413
        await post(http, gateway, ANONYMOUS, content_type="multipart/form-data; boundary=x"),
        await raw_request(gateway.port, request_with_target(b"/track/%2e%2e/x")),  # 400 path
        await raw_request(gateway.port, b"GARBAGE\r\n\r\n"),  # 400 from the HTTP parser
    ]
    assert [a.status for a in answers] == [404, 405, 401, 413, 415, 400, 400]
    ids = []
    for answer in answers:
        headers = {k.lower(): v for k, v in answer.headers.items()}
        assert headers["x-request-id"] == json.loads(answer.body)["error"]["request_id"]
        ids.append(headers["x-request-id"])
    assert len(set(ids)) == len(ids)
    assert upstream.received == []


async def test_valid_incoming_request_id_is_kept_and_forwarded(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    request_id = "req-1.2_3:ABC"
    answer = await post(http, gateway, ANONYMOUS, {"X-Request-Id": request_id})
    assert answer.status == 200
    assert answer.headers["X-Request-Id"] == request_id
    assert upstream.last_headers()["x-request-id"] == request_id
    refused = await post(http, gateway, identified(), {"X-Request-Id": request_id})
    assert refused.status == 401
    assert refused.headers["X-Request-Id"] == request_id
    assert refused.json()["error"]["request_id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param("has spaces in it", id="spaces"),
        pytest.param("r" * 129, id="too_long"),
        pytest.param('x"}, "injected": "y', id="json_breaking"),
        pytest.param("", id="empty"),
    ],
)
async def test_invalid_incoming_request_id_is_replaced(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, request_id: str
) -> None:
    answer = await post(http, gateway, ANONYMOUS, {"X-Request-Id": request_id})
    assert answer.status == 200
    made = answer.headers["X-Request-Id"]
    assert made != request_id
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", made)
    forwarded = [v for k, v in upstream.received[-1].headers if k.lower() == "x-request-id"]
    assert forwarded == [made]
    refused = await post(http, gateway, identified(), {"X-Request-Id": request_id})
    assert refused.headers["X-Request-Id"] != request_id
    assert refused.json()["error"]["request_id"] == refused.headers["X-Request-Id"]


# --- hop-by-hop headers --------------------------------------------------------------------------


async def final_response(port: int, data: bytes, wait_seconds: float = 5) -> list[RawResponse]:
    """Every response head to one request, 1xx included, the final one with its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[RawResponse] = []
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_seconds):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                status = int(head[0].split()[1])
                headers = {}
                for line in head[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if status >= 200 and length else b""
                answers.append(RawResponse(status, headers, body))
                if status >= 200:
                    return answers
    finally:
        writer.close()
        await writer.wait_closed()


async def test_hop_by_hop_headers_are_not_forwarded(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Hop-Secret, x_other_hop"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
        ("Proxy-Connection", "keep-alive"),
        ("Trailer", "X-Checksum"),
        ("Expect", "100-continue"),
        ("X-Hop-Secret", "internal"),
        ("X-Other-Hop", "internal"),
        ("X-End-To-End", "kept"),
    ]
    answers = await final_response(gateway.port, raw_http(EVENTS, headers, ANONYMOUS))
    assert [a.status for a in answers] == [100, 200]
    forwarded = upstream.last_headers()
    assert forwarded["x-end-to-end"] == "kept"
    for name in (
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "trailer",
        "expect",
        "x-hop-secret",
        "x-other-hop",
    ):
        assert name not in forwarded, name
    assert upstream.received[-1].body == ANONYMOUS.decode()


# --- monitor: the same decision, forwarded anyway -----------------------------------------------


@dataclass(frozen=True)
class Hostile:
    body: bytes
    headers: tuple[tuple[str, str], ...]
    reason: str


MONITOR_CASES = [
    pytest.param(
        Hostile(b'{"customer_ids": {"registered": "a", "registered": "b"}}', (), "duplicate_key"),
        id="duplicate_key",
    ),
    pytest.param(
        Hostile(
            b'{"customer_ids": {"registered": "a", "REGISTERED": "b"}}', (), "case_variant_key"
        ),
        id="case_variant_key",
    ),
    pytest.param(Hostile(b'{"v": NaN}', (), "json_invalid"), id="nan"),
    pytest.param(Hostile(b"\xef\xbb\xbf" + ANONYMOUS, (), "json_invalid"), id="bom"),
    pytest.param(Hostile(b'{"v": "\xff"}', (), "json_invalid"), id="invalid_utf8"),
    pytest.param(
        Hostile(b'{"customer_ids": {"registered": 7}}', (), "identity_invalid"),
        id="identity_number",
    ),
    pytest.param(
        Hostile(identified("alice"), (("X-User-Id", "bob"),), "identity_conflict"),
        id="identity_conflict",
    ),
    pytest.param(
        Hostile(ANONYMOUS, (("X-User-Id", "a"), ("X-User-Id", "a")), "header_duplicate"),
        id="header_duplicate",
    ),
    pytest.param(
        Hostile(ANONYMOUS, (("X-Session-Id", "s" * 129),), "session_id_too_long"),
        id="session_id_too_long",
    ),
    pytest.param(
        Hostile(
            ANONYMOUS,
            (("Content-Type", "application/x-www-form-urlencoded"),),
            "media_type_unsupported",
        ),
        id="form",
    ),
    pytest.param(
        Hostile(
            ANONYMOUS,
            (("Content-Type", "application/json; charset=latin-1"),),
            "charset_unsupported",
        ),
        id="latin1",
    ),
    pytest.param(
        Hostile(
            b"\x8b\x05\x80not-really-brotli", (("Content-Encoding", "br"),), "encoding_unsupported"
        ),
        id="brotli",
    ),
    pytest.param(
        Hostile(
            gzip.compress(ANONYMOUS) + b"garbage",
            (("Content-Encoding", "gzip"),),
            "encoding_invalid",
        ),
        id="gzip_trailing_garbage",
    ),
]


@pytest.fixture
async def verbatim_upstream() -> AsyncIterator[Upstream]:
    """A recording upstream that does not decode request bodies itself, so it can record
    encoded bodies the gateway forwarded untouched (the shared one would refuse a bad gzip)."""
    app = make_sample_upstream()
    runner = web.AppRunner(app, access_log=None, auto_decompress=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    yield Upstream(f"http://127.0.0.1:{port}", port, app)
    await runner.cleanup()


@pytest.mark.parametrize("hostile", MONITOR_CASES)
async def test_monitor_forwards_hostile_body_unverified(
    make_gateway: GatewayFactory, verbatim_upstream: Upstream, hostile: Hostile
) -> None:
    upstream = verbatim_upstream
    gateway = await make_gateway(monitor, upstream={"url": upstream.url, "timeout_seconds": 5})
    headers = hostile.headers
    if not any(name == "Content-Type" for name, _ in headers):
        headers = (("Content-Type", "application/json"), *headers)
    answer = await raw_request(gateway.port, raw_http(EVENTS, headers, hostile.body))
    assert answer.status == 200, answer.body
    assert json.loads(answer.body) == {"success": True}
    received = upstream.received[-1]
    assert received.body == hostile.body.decode("utf-8", "replace")  # forwarded unchanged
    forwarded = upstream.last_headers()
    assert forwarded["x-auth-status"] == "unverified"
    assert "x-authenticated-user" not in forwarded
    for name, value in hostile.headers:
        if name.lower() in ("content-type", "content-encoding"):
            assert forwarded[name.lower()] == value
    logged = (await gateway.access_log())[-1]
    assert logged["decision"] == "would_reject"
    assert logged["reason"] == hostile.reason


async def test_monitor_still_refuses_hostile_paths(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(monitor)
    target = b"/track/v2/projects/app/customers/%2e%2e/customers/events"
    assert_bad_request(await raw_request(gateway.port, request_with_target(target)), "path_invalid")
    assert upstream.received == []


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(
            raw_http(EVENTS, [], b" " * (SMALL_LIMIT + 1)), "body_too_large", id="content_length"
        ),
        pytest.param(
            raw_http(
                EVENTS,
                [("Transfer-Encoding", "chunked")],
                chunked(b" " * (SMALL_LIMIT * 2)),
                content_length=False,
            ),
            "body_too_large",
            id="chunked",
        ),
        pytest.param(
            raw_http(
                EVENTS,
                [("Content-Encoding", "gzip")],
                gzip.compress(b'{"pad": "' + b"0" * (SMALL_LIMIT * 64) + b'"}'),
            ),
            "decompressed_too_large",
            id="gzip_bomb",
        ),
    ],
)
async def test_monitor_still_answers_413_over_size_limits(
    make_gateway: GatewayFactory, upstream: Upstream, data: bytes, reason: str
) -> None:
    limits = {"max_body_bytes": SMALL_LIMIT, "max_decompressed_bytes": SMALL_LIMIT * 8}
    gateway = await make_gateway(monitor, limits=limits)
    answer = await raw_request(gateway.port, data)
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", reason)
    assert upstream.received == []
