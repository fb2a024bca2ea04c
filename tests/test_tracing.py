"""OpenTelemetry tracing against a real OTLP/HTTP receiver the test starts: a traced request is
one server span continuing the client's `traceparent`, with a child for token verification
(a cache miss only) and one for the upstream exchange, whose `traceparent` the upstream gets;
requests not sampled are not traced; a collector that is down slows and fails nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import GatewayFactory, Tokens, Upstream, eventually, free_port

EVENTS = "/track/v2/projects/app/customers/events"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


class Receiver:
    """An OTLP/HTTP trace receiver: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def of_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", found.traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield found, f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    await runner.cleanup()


def attributes(span: Span) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = (
            value.int_value if value.HasField("int_value") else value.string_value
        )
    return values


Post = Callable[[dict[str, str]], Awaitable[int]]


def poster(http: aiohttp.ClientSession, url: str, tokens: Tokens) -> Post:
    body = json.dumps({"customer_ids": {"registered": "alice"}})
    token = tokens.good("alice")

    async def post(headers: dict[str, str]) -> int:
        sent = {"X-Sdk-Auth-Token": token, "Content-Type": "application/json", **headers}
        async with http.post(url + EVENTS, data=body, headers=sent) as response:
            return response.status

    return post


async def test_a_traced_request_is_a_server_span_with_its_children_and_passes_it_on(
    make_gateway: GatewayFactory,
    receiver: tuple[Receiver, str],
    http: aiohttp.ClientSession,
    tokens: Tokens,
    upstream: Upstream,
) -> None:
    found, endpoint = receiver
    gateway = await make_gateway(tracing={"otlp_endpoint": endpoint, "sample_ratio": 0})
    post = poster(http, gateway.url, tokens)
    assert await post({"traceparent": SAMPLED}) == 200
    passed_on = upstream.last_headers()["traceparent"]

    async def three_spans() -> bool:
        return len(found.of_trace(TRACE_ID)) >= 3

    await eventually(three_spans, "the request's three spans at the receiver", 10)
    spans = {s.name: s for s in found.of_trace(TRACE_ID)}
    server = spans["gateway.request"]
    assert server.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert server.parent_span_id.hex() == CLIENT_SPAN  # the client's trace, continued
    assert attributes(server) == {
        "http.response.status_code": 200,
        "gateway.mode": "required",
        "http.route": "track-events",
        "gateway.upstream": "default",
        "gateway.project": "app",
        "gateway.decision": "verified",
    }
    verify, exchange = spans["gateway.verify_token"], spans["gateway.upstream"]
    assert verify.parent_span_id == server.span_id
    assert exchange.parent_span_id == server.span_id
    assert exchange.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert attributes(exchange) == {"http.response.status_code": 200}
    assert passed_on == f"00-{TRACE_ID}-{exchange.span_id.hex()}-01"

    # The same token again: a cache hit, so no verification span.
    second = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    assert await post({"traceparent": second}) == 200

    async def two_spans() -> bool:
        return len(found.of_trace("1" * 32)) >= 2

    await eventually(two_spans, "the second request's spans", 10)
    assert {s.name for s in found.of_trace("1" * 32)} == {"gateway.request", "gateway.upstream"}


async def test_requests_not_sampled_are_not_traced_and_their_traceparent_passes_unchanged(
    make_gateway: GatewayFactory,
    receiver: tuple[Receiver, str],
    http: aiohttp.ClientSession,
    tokens: Tokens,
    upstream: Upstream,
) -> None:
    found, endpoint = receiver
    gateway = await make_gateway(tracing={"otlp_endpoint": endpoint, "sample_ratio": 0})
    post = poster(http, gateway.url, tokens)
    unsampled = f"00-{TRACE_ID}-{CLIENT_SPAN}-00"
    assert await post({"traceparent": unsampled}) == 200
    assert upstream.last_headers()["traceparent"] == unsampled
    assert await post({}) == 200
    assert "traceparent" not in upstream.last_headers()
    await gateway.server.stop()  # flushes whatever was waiting to be exported
    assert found.spans == []


async def test_every_request_is_traced_at_ratio_one(
    make_gateway: GatewayFactory,
    receiver: tuple[Receiver, str],
    http: aiohttp.ClientSession,
    tokens: Tokens,
) -> None:
    found, endpoint = receiver
    gateway = await make_gateway(tracing={"otlp_endpoint": endpoint, "sample_ratio": 1})
    post = poster(http, gateway.url, tokens)
    for _ in range(3):
        assert await post({}) == 200

    async def three_requests() -> bool:
        return len([s for s in found.spans if s.name == "gateway.request"]) == 3

    await eventually(three_requests, "three server spans", 10)


async def test_a_collector_that_is_down_slows_and_fails_nothing(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, tokens: Tokens
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens there
    gateway = await make_gateway(tracing={"otlp_endpoint": endpoint, "sample_ratio": 1})
    post = poster(http, gateway.url, tokens)
    started = time.monotonic()
    statuses = [await post({"traceparent": SAMPLED}) for _ in range(20)]
    assert statuses == [200] * 20
    assert time.monotonic() - started < 2.0  # exporting happens on its own thread
