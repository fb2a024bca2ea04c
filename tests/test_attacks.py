"""Attack techniques, one test each, named after the technique, through real HTTP.

These complement tests/test_hostile.py (which already covers the basic smuggling pairs, the
path forms against the test config, duplicate keys at a few depths, malformed identities and
the gzip bomb) and tests/test_decisions.py / tests/test_vendors.py (the common bad tokens and the
HS256-with-the-RSA-PEM confusion). Each test sends its trick and checks both the answer (the
gateway's JSON error) and what reached the upstream (usually nothing). Bounds on time are
measured against deadlines, never slept for.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import hashlib
import hmac
import json
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.conftest import (
    EXAMPLES,
    ExampleFactory,
    GatewayFactory,
    KeyPair,
    RawResponse,
    RunningGateway,
    Tokens,
    Upstream,
    b64url,
    raw_request,
    sign_raw,
)

EVENTS = "/track/v2/projects/app/customers/events"
ANONYMOUS = b'{"customer_ids": {"cookie": "c-1"}}'
SMALL_LIMIT = 4096


def identified(user: str = "alice") -> bytes:
    return json.dumps({"customer_ids": {"registered": user}}, ensure_ascii=False).encode()


# --- raw HTTP ------------------------------------------------------------------------------------


def http(
    lines: Sequence[bytes | str],
    body: bytes = b"",
    *,
    target: str | bytes = EVENTS,
    content_length: bool = True,
) -> bytes:
    """One request as bytes: header `lines` exactly as given (str is sent as UTF-8)."""
    raw_target = target.encode() if isinstance(target, str) else target
    head = [b"POST " + raw_target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    head += [line.encode() if isinstance(line, str) else line for line in lines]
    if content_length:
        head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(body: bytes, extension: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n0\r\n\r\n" % (len(body), extension, body)


JSON = "Content-Type: application/json"


async def read_answers(port: int, data: bytes, count: int, wait: float = 5) -> list[RawResponse]:
    """`count` answers read from one connection, for pipelined requests."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers: list[RawResponse] = []
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            for _ in range(count):
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                answers.append(RawResponse(int(lines[0].split()[1]), headers, body))
    finally:
        writer.close()
        await writer.wait_closed()
    return answers


def error_of(answer: RawResponse) -> dict[str, Any]:
    """The contract's JSON error, either shape; fails on anything else."""
    assert answer.headers["content-type"] == "application/json", (answer.status, answer.body)
    body = json.loads(answer.body)
    assert next(iter(body)) == "token_expired"
    error = body["error"] if isinstance(body["error"], dict) else body
    assert answer.headers["x-request-id"] == error["request_id"]
    return {
        "code": error["code"],
        "reason": error["reason"],
        "token_expired": body["token_expired"],
    }


def assert_refused(answer: RawResponse, status: int, code: str, reason: str) -> None:
    assert answer.status == status, answer.body
    error = error_of(answer)
    assert (error["code"], error["reason"]) == (code, reason)
    assert error["token_expired"] is (code == "TOKEN_EXPIRED")


def assert_bad_request(answer: RawResponse, reason: str) -> None:
    assert_refused(answer, 400, "BAD_REQUEST", reason)


def assert_token_rejected(answer: RawResponse, reason: str) -> None:
    assert_refused(answer, 401, "TOKEN_REJECTED", reason)


async def post_token(
    gateway: RunningGateway, token: str, body: bytes | None = None, *lines: str
) -> RawResponse:
    data = http(
        [JSON, f"X-Sdk-Auth-Token: {token}", *lines], identified() if body is None else body
    )
    return await raw_request(gateway.port, data)


def forwarded_headers(upstream: Upstream) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in upstream.received[-1].headers:
        headers.setdefault(name.lower(), []).append(value)
    return headers


# --- request smuggling ---------------------------------------------------------------------------


async def test_transfer_encoding_xchunked_is_refused(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    for value in ("xchunked", "chunkedx", "chunked-false", "x chunked"):
        data = http([JSON, f"Transfer-Encoding: {value}"], chunked(ANONYMOUS), content_length=False)
        assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(
            ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], id="two_headers"
        ),
        pytest.param(["Transfer-Encoding: chunked, chunked"], id="one_list"),
        pytest.param(["Transfer-Encoding: chunked", "transfer-encoding: CHUNKED"], id="two_cases"),
    ],
)
async def test_transfer_encoding_chunked_twice_is_refused(
    gateway: RunningGateway, upstream: Upstream, lines: list[str]
) -> None:
    data = http([JSON, *lines], chunked(ANONYMOUS), content_length=False)
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"Transfer-Encoding:\tchunked\t", id="tab_around_value"),
        pytest.param(b"Transfer-Encoding\t: chunked", id="tab_before_colon"),
        pytest.param(b"Transfer-Encoding : chunked", id="space_before_colon"),
        pytest.param(b"Transfer-Encoding: \x0bchunked", id="vertical_tab"),
        pytest.param(b"Transfer-Encoding: \x0cchunked", id="form_feed"),
        pytest.param(b" Transfer-Encoding: chunked", id="leading_space_continuation"),
    ],
)
async def test_transfer_encoding_with_tabs_or_odd_whitespace_is_refused(
    gateway: RunningGateway, upstream: Upstream, line: bytes
) -> None:
    # A front end and a back end that disagree on whether this header counts is the classic
    # TE.CL desync; llhttp refuses them all (even the OWS tab a lenient parser would accept).
    data = http([JSON.encode(), line], chunked(ANONYMOUS), content_length=False)
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


async def test_transfer_encoding_odd_casing_is_read_as_chunked_and_reframed(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    data = http([JSON, "tRaNsFeR-eNcOdInG: ChUnKeD"], chunked(ANONYMOUS), content_length=False)
    answer = await raw_request(gateway.port, data)
    assert answer.status == 200, answer.body
    # The upstream gets the body it was authorised on, framed by Content-Length alone.
    assert upstream.received[-1].body == ANONYMOUS.decode()
    headers = forwarded_headers(upstream)
    assert "transfer-encoding" not in headers
    assert headers["content-length"] == [str(len(ANONYMOUS))]


async def test_transfer_encoding_gzip_chunked_is_never_decoded(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    # A transfer coding the gateway does not apply: the bytes stay compressed, so they are not
    # the JSON the upstream would see if it decoded them itself.
    data = http(
        [JSON, "Transfer-Encoding: gzip, chunked"],
        chunked(gzip.compress(identified("mallory"))),
        content_length=False,
    )
    assert_bad_request(await raw_request(gateway.port, data), "json_invalid")
    assert upstream.received == []


async def test_content_length_with_leading_zeros_is_read_as_decimal(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    body = b'{"a": "b"}'  # 10 bytes: "0010" read as octal would be 8
    assert len(body) == 10
    answers = await read_answers(
        gateway.port, http([JSON, "Content-Length: 0010"], body, content_length=False), 1
    )
    assert answers[0].status == 200, answers[0].body
    assert [r.body for r in upstream.received] == [body.decode()]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("+10", id="plus_sign"),
        pytest.param("-10", id="minus_sign"),
        pytest.param("0x0a", id="hexadecimal"),
        pytest.param("1 0", id="inner_space"),
        pytest.param("10.0", id="decimal_point"),
        pytest.param("1e1", id="exponent"),
        pytest.param("99999999999999999999999", id="overflow"),
    ],
)
async def test_content_length_not_plain_digits_is_refused(
    gateway: RunningGateway, upstream: Upstream, value: str
) -> None:
    data = http([JSON, f"Content-Length: {value}"], b'{"a": "b"}', content_length=False)
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(["Content-Length: 10", "Content-Length: 10"], id="same_value_twice"),
        pytest.param(["Content-Length: 10, 10"], id="list_same_values"),
        pytest.param(["Content-Length: 10, 2"], id="list_different_values"),
        pytest.param(["Content-Length: 10", "content-length: 2"], id="different_values_cases"),
    ],
)
async def test_content_length_repeated_or_listed_is_refused(
    gateway: RunningGateway, upstream: Upstream, lines: list[str]
) -> None:
    data = http([JSON, *lines], b'{"a": "b"}', content_length=False)
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


@pytest.mark.parametrize(
    "extension",
    [
        pytest.param(b";name=value", id="token_value"),
        pytest.param(b';name="va;l=ue"', id="quoted_value"),
        pytest.param(b";a;b=c", id="two_extensions"),
    ],
)
async def test_chunk_extensions_are_skipped_and_never_forwarded(
    gateway: RunningGateway, upstream: Upstream, extension: bytes
) -> None:
    data = http(
        [JSON, "Transfer-Encoding: chunked"], chunked(ANONYMOUS, extension), content_length=False
    )
    answer = await raw_request(gateway.port, data)
    assert answer.status == 200, answer.body
    assert upstream.received[-1].body == ANONYMOUS.decode()
    assert "transfer-encoding" not in forwarded_headers(upstream)


@pytest.mark.parametrize(
    "size_line",
    [
        pytest.param(b"1" + b"0" * 16, id="overflow_17_hex_digits"),
        pytest.param(b"0x23", id="hex_prefix"),
        pytest.param(b"23 ", id="trailing_space"),
        pytest.param(b"23;a=b\nc", id="extension_with_bare_lf"),
        pytest.param(b"+23", id="plus_sign"),
    ],
)
async def test_chunk_size_malformed_or_overflowing_is_refused(
    gateway: RunningGateway, upstream: Upstream, size_line: bytes
) -> None:
    assert len(ANONYMOUS) == 0x23
    body = size_line + b"\r\n" + ANONYMOUS + b"\r\n0\r\n\r\n"
    data = http([JSON, "Transfer-Encoding: chunked"], body, content_length=False)
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


async def test_chunk_size_beyond_every_limit_is_bounded_by_the_body_timeout(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    timeout = 0.5
    gateway = await make_gateway(limits={"body_timeout_seconds": timeout})
    body = b"F" * 16 + b"\r\n" + ANONYMOUS  # 2**64 - 1 bytes announced, 35 sent
    data = http([JSON, "Transfer-Encoding: chunked"], body, content_length=False)
    started = time.monotonic()
    answer = await raw_request(gateway.port, data, wait_seconds=timeout + 5)
    assert time.monotonic() - started < timeout + 3
    assert_bad_request(answer, "body_timeout")
    assert answer.headers["connection"] == "close"
    assert upstream.received == []


@pytest.mark.parametrize(
    "line", [b"X-User-Id:  alice \t", b"X-User-Id: alice  "], ids=["tab_last", "space_last"]
)
async def test_whitespace_around_a_header_value_is_read_as_the_upstream_reads_it(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, line: bytes
) -> None:
    # RFC 9110 reads neither leading nor trailing whitespace as part of a value, and neither
    # does the upstream: a token for "alice " must not pass for "X-User-Id: alice \t", which
    # the upstream reads as alice. (llhttp keeps trailing whitespace; found by test_fuzz.)
    spoofed = http([JSON, f"X-Sdk-Auth-Token: {tokens.good('alice ')}", line], ANONYMOUS)
    assert_refused(
        await raw_request(gateway.port, spoofed), 401, "TOKEN_REJECTED", "subject_mismatch"
    )
    assert upstream.received == []
    honest = http([JSON, f"X-Sdk-Auth-Token: {tokens.good('alice')}", line], ANONYMOUS)
    answer = await raw_request(gateway.port, honest)
    assert answer.status == 200, answer.body
    assert forwarded_headers(upstream)["x-user-id"] == ["alice"]


async def test_chunked_trailer_fields_are_never_read_as_headers(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    trailer = f"X-User-Id: mallory\r\nX-Sdk-Auth-Token: {tokens.good('mallory')}\r\n".encode()
    body = b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(ANONYMOUS), ANONYMOUS, trailer)
    data = http([JSON, "Transfer-Encoding: chunked"], body, content_length=False)
    answer = await raw_request(gateway.port, data)
    assert answer.status == 200, answer.body
    headers = forwarded_headers(upstream)
    assert headers["x-auth-status"] == ["anonymous"]
    assert "x-user-id" not in headers
    assert "x-sdk-auth-token" not in headers
    assert upstream.received[-1].body == ANONYMOUS.decode()


async def test_request_pipelined_after_a_chunked_body_is_its_own_request(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    # CL.TE desync: a front end that used Content-Length would see the second request as part
    # of the first body; the gateway reads the chunked framing and answers two requests.
    first = http([JSON, "Transfer-Encoding: chunked"], chunked(ANONYMOUS), content_length=False)
    second = http([JSON], identified("mallory"))
    answers = await read_answers(gateway.port, first + second, 2)
    assert answers[0].status == 200
    assert_refused(answers[1], 401, "TOKEN_NOT_PROVIDED", "token_missing")
    assert [r.body for r in upstream.received] == [ANONYMOUS.decode()]


# --- header injection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"X-User-Id: alice\rX-Auth-Status: verified", id="bare_cr"),
        pytest.param(b"X-User-Id: alice\nX-Auth-Status: verified", id="bare_lf"),
        pytest.param(b"X-User-Id: ali\x00ce", id="nul"),
        pytest.param(b"X-Sdk-Auth-Token: a\rb", id="cr_in_token"),
        pytest.param(b"X-Session-Id: s\x7f\x01", id="control_bytes"),
        pytest.param(b"X-User-Id\r\n : alice", id="crlf_in_name"),
    ],
)
async def test_cr_lf_or_nul_in_a_header_is_refused(
    gateway: RunningGateway, upstream: Upstream, line: bytes
) -> None:
    data = http([JSON.encode(), line], ANONYMOUS)
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


async def test_lf_only_line_endings_are_refused(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    data = http([JSON], identified("mallory")).replace(b"\r\n", b"\n")
    assert_bad_request(await raw_request(gateway.port, data), "http_malformed")
    assert upstream.received == []


async def test_crlf_in_the_token_subject_is_not_injected_into_forwarded_headers(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    # A validly signed token whose user id carries CRLF: no request could name that user (an
    # identity may hold no control character), so the token is refused, and no header is built.
    user = "alice\r\nX-Auth-Status: verified\r\nX-Injected: 1"
    answer = await post_token(gateway, tokens.good(user), ANONYMOUS)
    assert answer.status == 401, answer.body
    assert answer.json()["error"]["reason"] == "subject_invalid"
    assert upstream.received == []


@pytest.mark.parametrize(
    "user", [pytest.param("alice ", id="trailing"), pytest.param(" alice", id="leading")]
)
async def test_authenticated_user_with_edge_spaces_reads_back_exactly(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, user: str
) -> None:
    # "alice " is another user than "alice"; the identities compare exactly, so the request
    # passes — but a header value's edge whitespace is not part of it (RFC 9110 §5.5), so the
    # upstream must not be told "alice" was authenticated.
    answer = await post_token(gateway, tokens.good(user), identified(user))
    assert answer.status == 200, answer.body
    (value,) = forwarded_headers(upstream)["x-authenticated-user"]
    assert unquote(value) == user


# --- oversized and numerous headers --------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(http([JSON, "X-Big: " + "a" * 20_000], ANONYMOUS), id="one_huge_header"),
        pytest.param(http([JSON, "X-" + "n" * 20_000 + ": v"], ANONYMOUS), id="huge_name"),
        pytest.param(
            http([JSON, *(f"X-H{i}: v" for i in range(200))], ANONYMOUS), id="200_headers"
        ),
        pytest.param(
            # The parser's field limit is raised to max_token_bytes + 1024 (9216 by default).
            http([JSON, "X-Big: " + "a" * 9300], ANONYMOUS),
            id="just_over_the_raised_field_limit",
        ),
        pytest.param(http([JSON], ANONYMOUS, target=EVENTS + "?" + "a" * 20_000), id="huge_target"),
    ],
)
async def test_oversized_or_numerous_headers_are_400_json_not_a_hang(
    gateway: RunningGateway, upstream: Upstream, data: bytes
) -> None:
    started = time.monotonic()
    answer = await raw_request(gateway.port, data)
    assert time.monotonic() - started < 2
    assert_bad_request(answer, "http_malformed")
    assert upstream.received == []


# --- slow clients --------------------------------------------------------------------------------


async def test_slow_headers_connection_is_closed_within_a_bound(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    """Slowloris: a request head sent a byte at a time is never completed.

    Observed (aiohttp 3.14): nothing bounds the time a request head takes to arrive except the
    server's keep-alive timer, armed when the connection opens: `keepalive_timeout`, 3630 s by
    default, which the gateway does not set. The contract's only arrival bound is
    `limits.body_timeout_seconds`; a demanding proxy bounds the head too (HAProxy `timeout
    http-request`, Envoy `request_headers_timeout`). Expected here: closed (or answered) within
    that timeout plus a margin.
    """
    timeout = 1.0
    gateway = await make_gateway(
        limits={"body_timeout_seconds": timeout, "idle_timeout_seconds": timeout}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout + 4
    closed_after: float | None = None
    try:
        writer.write(f"POST {EVENTS} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        while loop.time() < deadline:
            try:
                writer.write(b"X")  # one more byte of a header name, never finished
                await writer.drain()
                async with asyncio.timeout(0.2):
                    data = await reader.read(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                data = b""
            if not data or data.startswith(b"HTTP/1.1 4"):
                closed_after = loop.time() - started
                break
    finally:
        writer.close()
    assert closed_after is not None, (
        f"a slow request head still held its connection after {deadline - started:.1f} s"
    )
    assert upstream.received == []


async def test_slow_body_is_answered_within_the_body_timeout(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    """A body trickled a byte every 50 ms (each byte resets any idle timer) is cut at
    `limits.body_timeout_seconds` of total time. Observed: the 400 comes at the timeout; the
    connection then stays open while aiohttp lingers to drain the body (`lingering_time`, 10 s,
    or until the announced length arrived) before closing it."""
    timeout = 0.5
    gateway = await make_gateway(limits={"body_timeout_seconds": timeout})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    loop = asyncio.get_running_loop()

    async def trickle() -> None:
        try:
            while True:
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.05)  # the attack's pace, not synchronisation
        except ConnectionError:
            return

    writer.write(http([JSON, "Content-Length: 100000"], b"{", content_length=False))
    started = loop.time()
    sender = asyncio.ensure_future(trickle())
    try:
        async with asyncio.timeout(timeout + 3):
            head = await reader.readuntil(b"\r\n\r\n")
        answered_after = loop.time() - started
    finally:
        sender.cancel()
        writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nConnection: close\r\n" in head
    assert timeout <= answered_after + 0.05 < timeout + 3
    assert upstream.received == []


# --- compression bombs ---------------------------------------------------------------------------


async def test_deflate_bomb_is_413(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gateway = await make_gateway(limits={"max_decompressed_bytes": 64 * 1024})
    bomb = zlib.compress(b'{"pad": "' + b"0" * (16 * 1024 * 1024) + b'"}', 9)
    assert len(bomb) < 20 * 1024
    data = http([JSON, "Content-Encoding: deflate"], bomb)
    started = time.monotonic()
    answer = await raw_request(gateway.port, data)
    assert time.monotonic() - started < 2
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "decompressed_too_large")
    assert upstream.received == []


async def test_nested_gzip_bomb_is_decoded_once_only(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    # gzip(gzip(1 GB of zeros)): tiny on the wire, small once decoded (the inner stream is ~1 MB),
    # enormous if decoded twice. One Content-Encoding means one decoding: what is left is gzip
    # bytes, not JSON.
    inner = gzip.compress(b"0" * (64 * 1024 * 1024), 9)
    outer = gzip.compress(inner, 9)
    assert len(outer) < len(inner) < 128 * 1024
    gateway = await make_gateway(limits={"max_decompressed_bytes": 1024 * 1024})
    started = time.monotonic()
    answer = await raw_request(gateway.port, http([JSON, "Content-Encoding: gzip"], outer))
    assert time.monotonic() - started < 2
    assert_bad_request(answer, "json_invalid")
    assert upstream.received == []


async def test_decompressed_size_limit_is_exact_at_the_edge(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    limit = 8192
    gateway = await make_gateway(limits={"max_decompressed_bytes": limit})
    prefix = b'{"customer_ids": {"cookie": "c"}, "pad": "'
    at_limit = prefix + b"0" * (limit - len(prefix) - 2) + b'"}'
    assert len(at_limit) == limit
    over = at_limit[:-2] + b'0"}'
    for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        answer = await raw_request(
            gateway.port, http([JSON, f"Content-Encoding: {coding}"], compress(at_limit))
        )
        assert answer.status == 200, answer.body
        answer = await raw_request(
            gateway.port, http([JSON, f"Content-Encoding: {coding}"], compress(over))
        )
        assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "decompressed_too_large")
    assert [r.body for r in upstream.received] == [at_limit.decode()] * 2


async def test_incompressible_body_is_limited_on_the_wire(
    make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    # A ratio near 1: the compressed body is itself over max_body_bytes, refused before decoding.
    gateway = await make_gateway(
        limits={"max_body_bytes": SMALL_LIMIT, "max_decompressed_bytes": 1024 * 1024}
    )
    noise = base64.b64encode(os.urandom(SMALL_LIMIT)).decode()
    body = gzip.compress(json.dumps({"customer_ids": {"cookie": "c"}, "pad": noise}).encode())
    assert len(body) > SMALL_LIMIT
    answer = await raw_request(gateway.port, http([JSON, "Content-Encoding: gzip"], body))
    assert_refused(answer, 413, "PAYLOAD_TOO_LARGE", "body_too_large")
    assert upstream.received == []


async def test_raw_deflate_without_zlib_wrapper_is_refused(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    # "deflate" means zlib (RFC 9110 §8.4.1.2); some decoders also accept a raw stream, so a
    # raw one could be read differently upstream.
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    body = raw.compress(identified("mallory")) + raw.flush()
    answer = await raw_request(gateway.port, http([JSON, "Content-Encoding: deflate"], body))
    assert_bad_request(answer, "encoding_invalid")
    assert upstream.received == []


# --- deeply nested JSON --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="arrays"),
        pytest.param(b'{"a":' * 100_000 + b"1" + b"}" * 100_000, id="objects"),
        pytest.param(b'{"customer_ids":' + b"[" * 100_000, id="unterminated"),
        pytest.param(
            b'{"customer_ids": {"registered": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}",
            id="in_identity",
        ),
    ],
)
async def test_deeply_nested_json_body_is_400_quickly(
    gateway: RunningGateway, upstream: Upstream, body: bytes
) -> None:
    started = time.monotonic()
    answer = await raw_request(gateway.port, http([JSON], body))
    assert time.monotonic() - started < 2
    assert_bad_request(answer, "json_invalid")
    assert upstream.received == []


async def test_deeply_nested_token_is_rejected_not_500(
    gateway: RunningGateway, upstream: Upstream, key_a: KeyPair, tokens: Tokens
) -> None:
    claims = json.dumps(tokens.claims()).encode()
    # 2000 levels: past Python's recursion limit, within max_token_bytes once encoded.
    nested_payload = claims[:-1] + b', "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    nested_header = (
        b'{"alg": "RS256", "kid": "key-a", "typ": "JWT", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    )
    for token in (
        sign_raw(b'{"alg": "RS256", "kid": "key-a", "typ": "JWT"}', nested_payload, key_a),
        sign_raw(nested_header, claims, key_a),
    ):
        assert_token_rejected(await post_token(gateway, token), "malformed")
    assert upstream.received == []


# --- claims: huge numbers and wrong types --------------------------------------------------------

CLAIM_VALUES = [
    pytest.param(b"1e400", "malformed", id="1e400"),
    pytest.param(b"1" + b"0" * 5000, "malformed", id="5000_digits"),
    pytest.param(b"18446744073709551616", "invalid", id="2_pow_64"),
    pytest.param(b"1e308", "invalid", id="1e308"),
    pytest.param(b'"1e3"', "invalid", id="string_1e3"),
    pytest.param(b"[]", "invalid", id="array"),
    pytest.param(b"{}", "invalid", id="object"),
    pytest.param(b"null", "invalid", id="null"),
    pytest.param(b"true", "invalid", id="true"),
    pytest.param(b"-0.5", "invalid", id="negative"),
]


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(("literal", "outcome"), CLAIM_VALUES)
async def test_huge_numbers_and_wrong_types_in_dates_are_rejected(
    gateway: RunningGateway,
    upstream: Upstream,
    key_a: KeyPair,
    tokens: Tokens,
    claim: str,
    literal: bytes,
    outcome: str,
) -> None:
    claims = {k: v for k, v in tokens.claims().items() if k != claim}
    payload = json.dumps(claims).encode()[:-1] + b', "%s": %s}' % (claim.encode(), literal)
    token = sign_raw(b'{"alg": "RS256", "typ": "JWT", "kid": "key-a"}', payload, key_a)
    reason = "malformed" if outcome == "malformed" else f"{claim}_invalid"
    assert_token_rejected(await post_token(gateway, token), reason)
    assert upstream.received == []


# --- algorithm confusion -------------------------------------------------------------------------


def ec_private() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(private: ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def sign_es256(
    header: dict[str, Any], claims: dict[str, Any], key: ec.EllipticCurvePrivateKey
) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def sign_hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
async def test_alg_none_in_every_spelling_is_rejected(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, key_a: KeyPair, alg: str
) -> None:
    header = json.dumps({"alg": alg, "typ": "JWT", "kid": "key-a"}).encode()
    payload = json.dumps(tokens.claims()).encode()
    unsigned = f"{b64url(header)}.{b64url(payload)}."
    assert_token_rejected(await post_token(gateway, unsigned), "malformed")
    # With a genuine RS256 signature over the same bytes: still not an allowed algorithm.
    assert_token_rejected(
        await post_token(gateway, sign_raw(header, payload, key_a)), "alg_not_allowed"
    )
    assert upstream.received == []


@pytest.mark.parametrize(
    "alg",
    [
        pytest.param(None, id="null"),
        pytest.param(["RS256"], id="list"),
        pytest.param({"RS256": True}, id="object"),
        pytest.param(256, id="number"),
        pytest.param(True, id="boolean"),
        pytest.param("rs256", id="lower_case"),
        pytest.param("RS256 ", id="trailing_space"),
        pytest.param("RS256\u0000", id="nul"),
    ],
)
async def test_alg_of_another_type_or_spelling_is_rejected(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, key_a: KeyPair, alg: Any
) -> None:
    header = json.dumps({"alg": alg, "kid": "key-a"}).encode()
    token = sign_raw(header, json.dumps(tokens.claims()).encode(), key_a)
    assert_token_rejected(await post_token(gateway, token), "alg_not_allowed")
    assert upstream.received == []


@pytest.mark.parametrize(
    "secret_form",
    ["pem", "pem_without_newline", "der", "pkcs1_pem"],
)
async def test_hs256_signed_with_the_rsa_public_key_is_rejected_without_an_hmac_key(
    make_gateway: GatewayFactory,
    upstream: Upstream,
    key_a: KeyPair,
    clock: Any,
    secret_form: str,
) -> None:
    def allow_hs256(config: dict[str, Any]) -> None:
        config["projects"]["app"]["algorithms"] = ["RS256", "HS256"]

    gateway = await make_gateway(allow_hs256)
    public = key_a.private.public_key()
    secret = {
        "pem": key_a.public_pem.encode(),
        "pem_without_newline": key_a.public_pem.strip().encode(),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "pkcs1_pem": public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        ),
    }[secret_form]
    claims = Tokens(key_a, clock).claims()
    named = sign_hs256({"alg": "HS256", "typ": "JWT", "kid": "key-a"}, claims, secret)
    assert_token_rejected(await post_token(gateway, named), "alg_not_allowed")
    kidless = sign_hs256({"alg": "HS256", "typ": "JWT"}, claims, secret)
    assert_token_rejected(await post_token(gateway, kidless), "no_compatible_key")
    assert upstream.received == []


@pytest.fixture
async def rsa_and_ec_gateway(
    make_gateway: GatewayFactory,
) -> tuple[RunningGateway, ec.EllipticCurvePrivateKey]:
    ec_key = ec_private()

    def both(config: dict[str, Any]) -> None:
        config["projects"]["app"]["algorithms"] = ["RS256", "ES256"]
        config["projects"]["app"]["keys"] = [
            {"id": "key-a", "pem_file": "keys/a.pem"},
            {"id": "ec-1", "pem": public_pem(ec_key)},
        ]

    return await make_gateway(both), ec_key


async def test_rs256_token_naming_an_ec_key_id_is_rejected(
    rsa_and_ec_gateway: tuple[RunningGateway, ec.EllipticCurvePrivateKey],
    upstream: Upstream,
    tokens: Tokens,
) -> None:
    gateway, _ = rsa_and_ec_gateway
    confused = tokens.mint(tokens.claims(), headers={"kid": "ec-1"})
    assert_token_rejected(await post_token(gateway, confused), "alg_not_allowed")
    assert upstream.received == []
    assert (await post_token(gateway, tokens.good())).status == 200  # the genuine one passes


async def test_es256_token_naming_an_rsa_key_id_is_rejected(
    rsa_and_ec_gateway: tuple[RunningGateway, ec.EllipticCurvePrivateKey],
    upstream: Upstream,
    tokens: Tokens,
) -> None:
    gateway, ec_key = rsa_and_ec_gateway
    claims = tokens.claims()
    confused = sign_es256({"alg": "ES256", "kid": "key-a", "typ": "JWT"}, claims, ec_key)
    assert_token_rejected(await post_token(gateway, confused), "alg_not_allowed")
    attacker = sign_es256(
        {"alg": "ES256", "typ": "JWT"}, claims, ec_private()
    )  # kid-less: EC keys only
    assert_token_rejected(await post_token(gateway, attacker), "signature_invalid")
    assert upstream.received == []
    genuine = sign_es256({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}, claims, ec_key)
    assert (await post_token(gateway, genuine)).status == 200


# --- kid -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        pytest.param("' OR 1=1 --", id="sql"),
        pytest.param('key-a" OR "1"="1', id="sql_quotes"),
        pytest.param("../../../../etc/passwd", id="path_traversal"),
        pytest.param("keys/a.pem", id="config_relative_path"),
        pytest.param("\u0000", id="nul"),
        pytest.param("key-a\u0000", id="nul_suffix"),
        pytest.param("KEY-A", id="case_variant"),
        pytest.param("key-a ", id="trailing_space"),
        pytest.param("key\u2010a", id="unicode_hyphen"),
        pytest.param("%6Bey-a", id="percent_encoded"),
        pytest.param("k" * 10_240, id="10kb"),
    ],
)
async def test_kid_with_path_sql_nul_or_huge_value_is_unknown_and_never_echoed(
    make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens, kid: str
) -> None:
    gateway = await make_gateway(limits={"max_token_bytes": 65_536})
    answer = await post_token(gateway, tokens.mint(tokens.claims(), headers={"kid": kid}))
    assert_token_rejected(answer, "kid_unknown")
    # Neither the answer nor the access log repeats the kid (no request input is echoed).
    logged = json.dumps(await gateway.access_log())
    for text in (answer.body.decode(), logged):
        assert json.dumps(kid)[1:-1] not in text
    assert upstream.received == []


@pytest.mark.parametrize("kid", [123, None, [], {}, "", True, ["key-a"]])
async def test_kid_of_another_type_is_kid_invalid(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, key_a: KeyPair, kid: Any
) -> None:
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode()
    token = sign_raw(header, json.dumps(tokens.claims()).encode(), key_a)
    assert_token_rejected(await post_token(gateway, token), "kid_invalid")
    assert upstream.received == []


# --- header fields that point at keys ------------------------------------------------------------


@dataclass
class KeyServer:
    url: str
    hits: list[str]


@pytest.fixture
async def attacker_key_server(key_b: KeyPair) -> AsyncIterator[KeyServer]:
    """A loopback server offering the attacker's key as a JWKS and a certificate; it records
    every request, so a fetch of any of them would show."""
    hits: list[str] = []
    numbers = key_b.private.public_key().public_numbers()
    jwks = {
        "keys": [
            {
                "kty": "RSA",
                "kid": "key-a",
                "alg": "RS256",
                "n": b64url(numbers.n.to_bytes(256, "big")),
                "e": b64url(numbers.e.to_bytes(3, "big")),
            }
        ]
    }

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response(jwks)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield KeyServer(f"http://127.0.0.1:{runner.addresses[0][1]}", hits)
    await runner.cleanup()


def attacker_jwk(key: KeyPair, kid: str = "key-a") -> dict[str, str]:
    numbers = key.private.public_key().public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "n": b64url(numbers.n.to_bytes(256, "big")),
        "e": b64url(numbers.e.to_bytes(3, "big")),
    }


def self_signed_certificate(key: KeyPair) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key.private, hashes.SHA256())
    )
    return base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()


async def test_jku_and_x5u_are_never_fetched(
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    key_b: KeyPair,
    attacker_key_server: KeyServer,
) -> None:
    url = attacker_key_server.url
    for field in ("jku", "x5u"):
        for kid in ("key-a", "attacker-1", None):
            headers = {field: f"{url}/{field}.json", "kid": kid}
            forged = tokens.mint(tokens.claims(), key=key_b, headers=headers)
            reason = "kid_unknown" if kid == "attacker-1" else "signature_invalid"
            assert_token_rejected(await post_token(gateway, forged), reason)
    assert upstream.received == []
    # A genuine token that also names a key URL passes: the field is ignored, not fetched.
    genuine = tokens.mint(tokens.claims(), headers={"jku": f"{url}/jku.json", "x5u": f"{url}/x"})
    assert (await post_token(gateway, genuine)).status == 200
    assert attacker_key_server.hits == []


@pytest.mark.parametrize("kid", ["key-a", None])
async def test_embedded_jwk_and_x5c_keys_are_never_trusted(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, key_b: KeyPair, kid: str | None
) -> None:
    for embedded in (
        {"jwk": attacker_jwk(key_b)},
        {"x5c": [self_signed_certificate(key_b)]},
        {"jwk": attacker_jwk(key_b), "x5c": [self_signed_certificate(key_b)]},
    ):
        forged = tokens.mint(tokens.claims(), key=key_b, headers={"kid": kid, **embedded})
        assert_token_rejected(await post_token(gateway, forged), "signature_invalid")
    assert upstream.received == []


@pytest.mark.parametrize(
    "crit",
    [
        pytest.param([], id="empty_list"),
        pytest.param(["b64"], id="b64"),
        pytest.param(["alg"], id="registered_name"),
        pytest.param(["x-unknown"], id="unknown_name"),
        pytest.param([""], id="empty_name"),
        pytest.param("exp", id="string"),
        pytest.param(None, id="null"),
        pytest.param({"b64": False}, id="object"),
        pytest.param(["exp", "exp"], id="repeated"),
    ],
)
async def test_crit_in_any_form_is_rejected(
    gateway: RunningGateway, upstream: Upstream, tokens: Tokens, key_a: KeyPair, crit: Any
) -> None:
    header = {"alg": "RS256", "typ": "JWT", "kid": "key-a", "crit": crit, "b64": False}
    token = sign_raw(json.dumps(header).encode(), json.dumps(tokens.claims()).encode(), key_a)
    assert_token_rejected(await post_token(gateway, token), "crit_unsupported")
    assert upstream.received == []


# --- Unicode look-alikes and normalisation -------------------------------------------------------

LOOK_ALIKES = [
    pytest.param("alice", "\u0430lice", id="cyrillic_a"),
    pytest.param("alice", "ALICE", id="upper_case"),
    pytest.param("alice", "Alice", id="capitalised"),
    pytest.param("alice", "alice ", id="trailing_space"),
    pytest.param("alice", " alice", id="leading_space"),
    pytest.param("alice", "alice\u00a0", id="no_break_space"),
    pytest.param("jos\u00e9", "jose\u0301", id="nfc_token_nfd_body"),
    pytest.param("jose\u0301", "jos\u00e9", id="nfd_token_nfc_body"),
    pytest.param("alice", "\uff41\uff4c\uff49\uff43\uff45", id="fullwidth"),
    pytest.param("alice", "al\u200dice", id="zero_width_joiner"),
    pytest.param("alice", "al\u200bice", id="zero_width_space"),
    pytest.param("alice", "alice\ufeff", id="bom_inside"),
    pytest.param("Kelvin", "\u212aelvin", id="kelvin_sign"),
    pytest.param("stra\u00dfe", "strasse", id="sharp_s"),
    pytest.param("file", "\ufb01le", id="ligature"),
    pytest.param("alice", "al\u0131ce", id="dotless_i"),
]


@pytest.mark.parametrize("place", ["body", "header"])
@pytest.mark.parametrize(("token_user", "claimed"), LOOK_ALIKES)
async def test_look_alike_user_ids_never_match(
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    token_user: str,
    claimed: str,
    place: str,
) -> None:
    assert token_user != claimed
    if place == "header" and claimed.strip(" \t") != claimed:
        # Edge spaces and tabs are not part of a header value (RFC 9110 §5.5): sent in a
        # header, "alice " *is* "alice". The body keeps them, and the body case checks them.
        claimed = claimed.strip(" \t")
        assert claimed == token_user
    token = tokens.good(token_user)
    if place == "body":
        answer = await post_token(gateway, token, identified(claimed))
    else:
        answer = await post_token(gateway, token, ANONYMOUS, f"X-User-Id: {claimed}")
    if claimed == token_user:
        assert answer.status == 200, answer.body
        return
    assert_token_rejected(answer, "subject_mismatch")
    assert upstream.received == []
    # The same token for its own user, written the same way, passes.
    if place == "body":
        answer = await post_token(gateway, token, identified(token_user))
    else:
        answer = await post_token(gateway, token, ANONYMOUS, f"X-User-Id: {token_user}")
    assert answer.status == 200, answer.body


# --- duplicate keys at every depth ---------------------------------------------------------------


def nested(depth: int, inner: bytes, *, arrays: bool) -> bytes:
    opening, closing = (b'[{"n":', b"}]") if arrays else (b'{"n":', b"}")
    return opening * depth + inner + closing * depth


async def test_duplicate_key_at_every_depth_of_the_body_is_refused(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    for depth in range(64):
        for arrays in (False, True):
            for duplicate in (b'{"k": 1, "k": 1}', b'{"k": 1, "\\u006b": 2}'):
                body = b'{"customer_ids": {"cookie": "c"}, "x": %s}' % nested(
                    depth, duplicate, arrays=arrays
                )
                answer = await raw_request(gateway.port, http([JSON], body))
                assert_bad_request(answer, "duplicate_key")
    # On the identity path, spelled with an escape: the same key to every JSON reader.
    for body in (
        b'{"customer_ids": {"registered": "alice", "r\\u0065gistered": "mallory"}}',
        b'{"customer_ids": {"registered": "alice"}, "\\u0063ustomer_ids": {}}',
    ):
        assert_bad_request(await raw_request(gateway.port, http([JSON], body)), "duplicate_key")
    assert upstream.received == []


async def test_duplicate_key_at_every_depth_of_the_token_is_refused(
    make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens, key_a: KeyPair
) -> None:
    # Many failures from one client: not limited, so each is answered on its own merits.
    gateway = await make_gateway(failure_counter={"threshold": 10**6})
    header = b'{"alg": "RS256", "typ": "JWT", "kid": "key-a"}'
    claims = json.dumps(tokens.claims()).encode()
    without_sub = json.dumps({k: v for k, v in tokens.claims().items() if k != "sub"}).encode()
    cases: list[tuple[bytes, bytes]] = []
    for depth in range(16):
        for arrays in (False, True):
            inner = nested(depth, b'{"k": 1, "k": 2}', arrays=arrays)
            cases.append((header[:-1] + b', "x": ' + inner + b"}", claims))
            cases.append((header, claims[:-1] + b', "x": ' + inner + b"}"))
    cases += [
        (header, claims[:-1] + b', "\\u0065xp": 1}'),  # "exp" twice, once escaped
        (header, claims[:-1] + b', "sub": {"key": "uid", "value": "mallory"}}'),
        (header, b'{"sub": {"key": "uid", "key": "uid", "value": "alice"}, ' + without_sub[1:]),
        (b'{"alg": "none", "alg": "RS256", "kid": "key-a"}', claims),
        (b'{"alg": "RS256", "kid": "key-a", "k\\u0069d": "key-b"}', claims),
    ]
    for signed_header, payload in cases:
        token = sign_raw(signed_header, payload, key_a)
        assert_token_rejected(await post_token(gateway, token), "duplicate_key")
    assert upstream.received == []


# --- path tricks against every route of the example configs ------------------------------------

API_KEY = "public-api-key-0123456789"
EXAMPLE_ENV = {
    "SHOP_EU_PUBLIC_API_KEY": API_KEY,
    "SHOP_EU_KEY_7_SECRET": "c" * 32,
    "STREAM_ORDERS_SECRET": "s" * 64,
}


@dataclass(frozen=True)
class ExampleRoute:
    name: str
    path: str
    body: bytes
    lines: tuple[str, ...]
    required: bool


def body_for(json_path: str, leaf: Any) -> bytes:
    steps = re.findall(r"\[\*\]|[^.\[\]]+", json_path)
    value = leaf
    for step in reversed(steps):
        value = [value] if step == "[*]" else {step: value}
    return json.dumps(value).encode()


def example_routes(name: str) -> list[ExampleRoute]:
    """Every route of a shipped example, with a concrete path and an identified body."""
    config = yaml.safe_load((EXAMPLES / name).read_text())
    routes = []
    for route in config["routes"]:
        template = route["path"]
        found = re.search(r"\{project(?::([^}]*))?\}", template)
        if found is None:  # a fixed `project: {id: ...}`
            project, path = route["project"]["id"], template
        else:
            listed = found.group(1)
            project = listed.split("|")[0] if listed else next(iter(config["projects"]))
            path = template.replace(found.group(0), project)
        assert "{" not in path
        settings = config["projects"][project]
        sources = route.get("identity", config.get("identity", []))
        json_path = next(s["json"] for s in sources if "json" in s)
        id_map = settings["subject"]["format"] == "id_map"
        lines = [JSON] + ([f"Authorization: Token {API_KEY}"] if "api_key" in route["auth"] else [])
        body = body_for(json_path, {"registered": "alice"} if id_map else "alice")
        routes.append(
            ExampleRoute(route["name"], path, body, tuple(lines), settings["mode"] == "required")
        )
    return routes


def segments_of(path: str) -> list[str]:
    return path.split("/")[1:]


def join(segments: Sequence[str]) -> str:
    return "/" + "/".join(segments)


def trick_variants(path: str, trick: str) -> list[str]:
    segments = segments_of(path)
    slashes = [i for i, c in enumerate(path) if c == "/"]
    per_segment = range(len(segments))
    variants: dict[str, list[str]] = {
        "trailing_slash": [path + "/"],
        "double_slash": [path[:i] + "/" + path[i:] for i in slashes],
        "dot_segment": [path[:i] + "/." + path[i:] for i in slashes] + [path + "/."],
        "dot_dot_segment": [path[:i] + "/x/.." + path[i:] for i in slashes],
        "encoded_slash": [
            path[:i] + e + path[i + 1 :] for i in slashes[1:] for e in ("%2F", "%2f")
        ],
        "semicolon_params": [
            join([*segments[:n], segments[n] + ";jsessionid=1", *segments[n + 1 :]])
            for n in per_segment
        ],
        "upper_case_segment": [
            join([*segments[:n], segments[n].upper(), *segments[n + 1 :]]) for n in per_segment
        ]
        + [path.upper()],
        "percent_encoded_letter": [
            join(
                [*segments[:n], f"%{ord(segments[n][0]):02X}" + segments[n][1:], *segments[n + 1 :]]
            )
            for n in per_segment
        ],
        "encoded_dot_segment": [path[:i] + "/%2e" + path[i:] for i in slashes]
        + [path + "/%2e%2e/" + segments[-1]],
        "backslash": [path[:i] + "\\" + path[i + 1 :] for i in slashes[1:]],
    }
    return [v for v in variants[trick] if v != path]


TRICKS = [
    "trailing_slash",
    "double_slash",
    "dot_segment",
    "dot_dot_segment",
    "encoded_slash",
    "semicolon_params",
    "upper_case_segment",
    "percent_encoded_letter",
    "encoded_dot_segment",
    "backslash",
]
CANONICAL = re.compile(r"(/[A-Za-z0-9._~-]+)+")


EXAMPLE_NAMES = [
    "moengage.yaml",
    "bloomreach.yaml",
    "braze.yaml",
    "segment.yaml",
    "amplitude.yaml",
]


async def serve_examples(
    serve_example: ExampleFactory, name: str, key_a: KeyPair, key_b: KeyPair
) -> RunningGateway:
    key_files = {
        "moengage.yaml": {
            "keys/moengage-a.public.pem": key_a.public_pem,
            "keys/moengage-b.public.pem": key_b.public_pem,
        },
        "bloomreach.yaml": {},
        "braze.yaml": {
            "keys/braze-rsa.public.pem": key_a.public_pem,
            "keys/braze-ec.public.pem": public_pem(ec_private()),
        },
        "segment.yaml": {"keys/segment-rsa.public.pem": key_a.public_pem},
        "amplitude.yaml": {"keys/amplitude-ec.public.pem": public_pem(ec_private())},
    }[name]
    return await serve_example(name, key_files, EXAMPLE_ENV)


@pytest.mark.parametrize("trick", TRICKS)
@pytest.mark.parametrize("example", EXAMPLE_NAMES)
async def test_path_tricks_against_every_example_route(
    serve_example: ExampleFactory,
    upstream: Upstream,
    key_a: KeyPair,
    key_b: KeyPair,
    example: str,
    trick: str,
) -> None:
    gateway = await serve_examples(serve_example, example, key_a, key_b)
    routes = example_routes(example)
    assert routes
    sent = 0
    for route in routes:
        # The canonical path: the route's own decision (no token: refused unless monitor).
        answer = await raw_request(gateway.port, http(route.lines, route.body, target=route.path))
        assert (answer.status == 200) is (not route.required), (route.name, answer.body)
        for variant in trick_variants(route.path, trick):
            sent += 1
            request_id = f"trick-{sent}"
            data = http(
                [*route.lines, f"X-Request-Id: {request_id}"], route.body, target=variant.encode()
            )
            answer = await raw_request(gateway.port, data)
            reached = [
                r
                for r in upstream.received
                if ("x-request-id", request_id) in ((k.lower(), v) for k, v in r.headers)
            ]
            if answer.status != 200:
                error = error_of(answer)
                assert answer.status in (400, 401, 403, 404, 405), (variant, answer.body)
                assert error["code"] != "INTERNAL_ERROR"
                assert reached == [], (route.name, variant)
                continue
            # Forwarded: only a path already in one canonical form, exactly as sent, and never
            # an identified request without its token where the project requires one.
            assert not route.required, (route.name, variant)
            assert CANONICAL.fullmatch(variant), (route.name, variant)
            assert [r.path_qs for r in reached] == [variant]
    assert sent > 0


def test_path_tricks_cover_every_route_of_every_example() -> None:
    names = {
        name: {r["name"] for r in yaml.safe_load((EXAMPLES / name).read_text())["routes"]}
        for name in EXAMPLE_NAMES
    }
    for name, expected in names.items():
        assert expected
        assert {r.name for r in example_routes(name)} == expected
