"""The upstream side read as strictly as the client side: every answer llhttp (or the gateway's
checks on top of it) could read two ways is a 502, never relayed; a connection that carried
anything beyond its answer is never reused; pooled connections are closed before the upstream's
keep-alive would close them under a request. And on the client side, the Host and version rules
of RFC 9112."""

from __future__ import annotations

import asyncio
import os
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http.errors import UpstreamBroken
from gateway.http.response_reader import ResponseReader
from tests.conftest import GatewayFactory, eventually, raw_request

SDK_CONFIG = "/v2/sdkconfig"
GET = f"GET {SDK_CONFIG} HTTP/1.1\r\nHost: gw\r\nX-App-Id: app\r\n\r\n".encode()


class RawUpstream:
    """An upstream that answers each request with bytes the test fixes, and records on which
    connection each request came and which connections the gateway closed."""

    def __init__(self, answers: Callable[[int], bytes]) -> None:
        self.answers = answers  # request number → the bytes written back
        self.requests: list[int] = []  # the connection each request came on
        self.closed: set[int] = set()  # connections the gateway closed
        self.stray = asyncio.Event()  # set: write `stray_bytes` on the first connection
        self.stray_bytes = b""
        self.keep_alive_seconds: float | None = None  # close idle connections after this
        self._connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self._connections = self._connections, self._connections + 1
        try:
            while True:
                async with asyncio.timeout(self.keep_alive_seconds):
                    await reader.readuntil(b"\r\n\r\n")
                self.requests.append(number)
                writer.write(self.answers(len(self.requests) - 1))
                await writer.drain()
                if number == 0 and self.stray_bytes:
                    await self.stray.wait()
                    writer.write(self.stray_bytes)
                    await writer.drain()
        except TimeoutError:
            pass  # idle past our keep-alive: closed, as Node would
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.add(number)
        finally:
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Callable[[int], bytes]], Awaitable[Any]]]:
    started: list[RawUpstream] = []

    async def start(answers: Callable[[int], bytes]) -> RawUpstream:
        upstream = RawUpstream(answers)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


async def gateway_for(
    make_gateway: GatewayFactory, upstream: RawUpstream, **upstream_keys: Any
) -> int:
    running = await make_gateway(
        upstream={"url": upstream.url, "timeout_seconds": 5, **upstream_keys}
    )
    return running.port


async def closed_by_gateway(upstream: RawUpstream, connection: int) -> None:
    """Polls, with a deadline, until the gateway has closed that upstream connection."""

    async def closed() -> bool:
        return connection in upstream.closed

    await eventually(closed, f"the gateway to close upstream connection {connection}", 5)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", id="chunk_size_0x"),
        pytest.param(CHUNKED + b"1_0\r\nhellohello\r\n0\r\n\r\n", id="chunk_size_underscore"),
        pytest.param(CHUNKED + b"5\x0b\r\nhello\r\n0\r\n\r\n", id="chunk_size_vertical_tab"),
        pytest.param(CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", id="chunk_size_sign"),
        pytest.param(b"HTTP/1.1 200garbage\r\nContent-Length: 2\r\n\r\nok", id="status_garbage"),
        pytest.param(b"HTTP/1.1 099 Early\r\nContent-Length: 2\r\n\r\nok", id="status_099"),
        pytest.param(b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="version_2"),
        pytest.param(b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\n\r\n", id="protocol_switch"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", id="nul"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok", id="ctl"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok", id="obs_fold"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            id="gzip_chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            id="chunked_chunked",
        ),
        pytest.param(
            CHUNKED.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            + b"2\r\nok\r\n0\r\n\r\n",
            id="two_transfer_encodings",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="two_lengths"
        ),
        pytest.param(
            CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Length: 2\r\n\r\n")
            + b"2\r\nok\r\n0\r\n\r\n",
            id="length_and_chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n"
            + b"X-Pad: "
            + b"a" * (70 * 1024)
            + b"\r\nContent-Length: 2\r\n\r\nok",
            id="head_70_KiB_in_one_segment",
        ),
        pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", id="bare_lf"),
    ],
)
async def test_an_answer_with_two_readings_is_a_502_and_never_relayed(
    make_gateway: GatewayFactory, raw_upstream: Any, answer: bytes
) -> None:
    upstream = await raw_upstream(lambda n: answer)
    port = await gateway_for(make_gateway, upstream)
    response = await raw_request(port, GET)
    assert response.status == 502, response
    assert response.json()["error"]["reason"] == "upstream_failed"  # the gateway's own body


async def test_an_interim_answer_is_read_past(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    upstream = await raw_upstream(lambda n: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)
    port = await gateway_for(make_gateway, upstream)
    response = await raw_request(port, GET)
    assert (response.status, response.body) == (200, b"ok")
    assert "link" not in response.headers


async def test_a_valid_chunked_answer_is_relayed_whole(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    upstream = await raw_upstream(
        lambda n: CHUNKED + b"2;ext=1\r\nok\r\n3\r\n!!!\r\n0\r\nT: x\r\n\r\n"
    )
    port = await gateway_for(make_gateway, upstream)
    response = await raw_request(port, GET)
    assert (response.status, response.body) == (200, b"ok!!!")


async def test_an_unsolicited_answer_closes_the_connection_it_came_on(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    """An upstream that sends a second answer nobody asked for, after a correct one: the next
    client must never get it as its own."""
    answers = [OK, b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"]
    upstream = await raw_upstream(lambda n: answers[min(n, 1)])
    upstream.stray_bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
    port = await gateway_for(make_gateway, upstream)
    assert (await raw_request(port, GET)).body == b"ok"
    upstream.stray.set()
    await closed_by_gateway(upstream, 0)  # as soon as the bytes arrive
    second = await raw_request(port, GET)
    assert (second.status, second.body) == (200, b"second")
    assert upstream.requests == [0, 1]


async def test_an_answer_followed_by_more_bytes_stands_but_its_connection_is_not_reused(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    upstream = await raw_upstream(lambda n: OK + b"HTTP/1.1 200 OK\r\n" if n == 0 else OK)
    port = await gateway_for(make_gateway, upstream)
    first = await raw_request(port, GET)
    assert (first.status, first.body) == (200, b"ok")
    second = await raw_request(port, GET)
    assert (second.status, second.body) == (200, b"ok")
    assert upstream.requests == [0, 1]  # a new connection for the second


async def test_requests_just_past_the_upstreams_keep_alive_never_meet_a_closing_connection(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    """An upstream that closes connections idle for 1 s (as Node does at 5 s): requests
    spaced just past it, with the gateway's idle timeout below it, all succeed on new
    connections; none is a 502."""
    upstream = await raw_upstream(lambda n: OK)
    upstream.keep_alive_seconds = 1.0
    port = await gateway_for(make_gateway, upstream, idle_timeout_seconds=0.9)
    statuses = []
    for _ in range(3):
        statuses.append((await raw_request(port, GET)).status)
        await asyncio.sleep(1.05)  # the scenario itself: just past the upstream's keep-alive
    assert statuses == [200, 200, 200]
    assert upstream.requests == [0, 1, 2]


async def test_a_pooled_connection_idle_past_the_idle_timeout_is_closed(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    upstream = await raw_upstream(lambda n: OK)
    port = await gateway_for(make_gateway, upstream, idle_timeout_seconds=0.2)
    assert (await raw_request(port, GET)).status == 200
    await closed_by_gateway(upstream, 0)


# === the client side ==============================================================================


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        pytest.param(
            f"GET {SDK_CONFIG} HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-App-Id: app\r\n\r\n",
            400,
            "http_malformed",
            id="two_hosts",
        ),
        pytest.param(
            f"GET {SDK_CONFIG} HTTP/1.1\r\nX-App-Id: app\r\n\r\n",
            400,
            "http_malformed",
            id="no_host",
        ),
        pytest.param(
            f"GET {SDK_CONFIG} HTTP/2.0\r\nHost: a\r\nX-App-Id: app\r\n\r\n",
            505,
            "http_version_unsupported",
            id="http_2_as_text",
        ),
        pytest.param(f"GET {SDK_CONFIG}\r\n\r\n", 400, "http_malformed", id="http_0_9"),
    ],
)
async def test_host_and_version_rules_on_the_client_side(
    make_gateway: GatewayFactory, raw_upstream: Any, request_bytes: str, status: int, reason: str
) -> None:
    upstream = await raw_upstream(lambda n: OK)
    port = await gateway_for(make_gateway, upstream)
    response = await raw_request(port, request_bytes.encode())
    assert response.status == status, response
    assert response.json()["error"]["reason"] == reason
    assert upstream.requests == []


async def test_http_1_0_without_host_is_forwarded(
    make_gateway: GatewayFactory, raw_upstream: Any
) -> None:
    upstream = await raw_upstream(lambda n: OK)
    port = await gateway_for(make_gateway, upstream)
    response = await raw_request(
        port, f"GET {SDK_CONFIG} HTTP/1.0\r\nX-App-Id: app\r\n\r\n".encode()
    )
    assert (response.status, response.body) == (200, b"ok")
    assert upstream.requests == [0]


# === the response reader under hypothesis =========================================================

FUZZ = settings(
    max_examples=3000 if os.environ.get("GATEWAY_FUZZ") == "deep" else 150, deadline=None
)
_TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=12)
_VALUE = st.text(alphabet=string.ascii_letters + string.digits + " ;=,./", max_size=20)
# Framing and hop-by-hop fields (RFC 9110 §7.6.1): the reader leaves them out of the answer's
# end-to-end lines, so a generated answer that names one expects it gone.
_RESERVED = {
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "trailer",
    "te",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
}
_SAFE_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: [\t\x20-\x7e\x80-\xff]*")


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, int, list[bytes], bytes]:
    """A well-formed answer: its bytes, its status, its end-to-end lines, its body."""
    status = draw(st.integers(200, 599).filter(lambda s: s not in (204, 304)))
    fields = draw(st.lists(st.tuples(_TOKEN, _VALUE.map(str.strip)), max_size=6))
    lines = [f"{n}: {v}".encode() for n, v in fields if n.lower() not in _RESERVED]
    body = draw(st.binary(max_size=300))
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(line + b"\r\n" for line in lines)
    if draw(st.booleans()):
        framed = head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    else:
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        chunks = b"".join(b"%x;e=1\r\n%b\r\n" % (len(p), p) for p in pieces if p)
        framed = head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nT: 1\r\n\r\n"
    return framed, status, lines, body


def _feed(reader: ResponseReader, data: bytes, cuts: list[int]) -> None:
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        reader.feed(data[a:b])


@FUZZ
@given(answer=answers(), cuts=st.lists(st.integers(0, 2000), max_size=5).map(sorted))
def test_a_well_formed_answer_reads_as_itself_however_it_is_segmented(
    answer: tuple[bytes, int, list[bytes], bytes], cuts: list[int]
) -> None:
    data, status, lines, body = answer
    reader = ResponseReader()
    reader.begin("GET")
    _feed(reader, data, [c for c in cuts if c <= len(data)])
    assert reader.head is not None
    assert reader.head.status == status
    assert list(reader.head.lines) == lines
    assert b"".join(reader.pieces) == body
    assert (reader.ended, reader.keep_alive) == (True, True)


@FUZZ
@given(
    answer=answers(),
    position=st.integers(0, 2000),
    byte=st.integers(0, 255),
    how=st.sampled_from(["insert", "replace", "delete"]),
)
def test_a_damaged_answer_is_refused_or_read_safely(
    answer: tuple[bytes, int, list[bytes], bytes], position: int, byte: int, how: str
) -> None:
    """Any one byte inserted, replaced or deleted: the reader refuses with `UpstreamBroken` (and
    nothing else), or what it relays is safe to write to a client: field lines that cannot
    split an answer, a status of three digits."""
    data = answer[0]
    at = position % (len(data) + 1)
    damaged = {
        "insert": data[:at] + bytes([byte]) + data[at:],
        "replace": data[:at] + bytes([byte]) + data[at + 1 :],
        "delete": data[:at] + data[at + 1 :],
    }[how]
    reader = ResponseReader()
    reader.begin("GET")
    try:
        reader.feed(damaged)
    except UpstreamBroken:
        return
    if reader.head is not None:
        assert 200 <= reader.head.status <= 999
        assert all(_SAFE_LINE.fullmatch(line) for line in reader.head.lines), reader.head.lines
