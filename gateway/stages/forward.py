"""Forwarding: the request as the upstream gets it, the exchange, and the answer relayed back
with the gateway's own headers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.auth.target import Target
from gateway.auth.verified import token_exp, token_user
from gateway.base import traced
from gateway.base.clock import perf_counter
from gateway.config.compiled import CompiledConfig
from gateway.config.projects import Project
from gateway.forwarding.headers import (
    Forwarding,
    forward_headers,
    is_trusted,
    response_headers,
    strip_query,
)
from gateway.forwarding.upstream import FAILURES, Upstream, failure_reason
from gateway.http.client import Answer
from gateway.http.messages import Request, Response, Streamed
from gateway.refusals.reasons import Rejected
from gateway.stages.authenticate import Checked
from gateway.stages.exchange import Exchange
from gateway.telemetry.metrics import Timings


@dataclass(slots=True)
class Outgoing:
    """A request as the upstream gets it."""

    method: str
    path: str
    query: str | None
    header_lines: list[bytes]
    body: bytes

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(
        self, method: str, path: str, query: str | None, header_lines: list[bytes], body: bytes
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.header_lines = header_lines
        self.body = body


def outgoing(
    request: Request,
    target: Target,
    exchange: Exchange,
    checked: Checked,
    status: str,
    config: CompiledConfig,
) -> Outgoing:
    route, project = exchange.route, exchange.project
    assert route is not None
    assert project is not None
    verified = checked.attempt.verified
    forwarding = Forwarding(
        request_id=exchange.request_id,
        auth_status=status,
        authenticated_user=project.subject.header(checked.attempt.identity, token_user(verified))
        if verified
        else None,
        peer=request.remote,
        peer_trusted=is_trusted(request.remote, config.trusted_proxies),
        scheme=b"https" if config.listener_tls else b"http",
        drop=route.token_header_drop | {"content-encoding"}
        if checked.decoded
        else route.token_header_drop,
        token_scheme_drop=route.token_scheme_drop,
    )
    return Outgoing(
        request.method,
        target.path,
        strip_query(target.query, route.token_query_drop),
        forward_headers(request.header_keys(), request.raw_headers, forwarding),
        checked.body,
    )


async def exchange_with(upstream: Upstream, sent: Outgoing, timings: Timings) -> Answer:
    """The upstream's answer; 502/504 when it cannot be had. In a traced request, a child
    span for the exchange, which the upstream's `traceparent` names."""
    opener = traced.current.get()
    span = None if opener is None else opener("gateway.upstream")
    if span is not None:
        sent.header_lines = with_traceparent(sent.header_lines, span.traceparent)
    started = perf_counter()
    try:
        answer = await upstream.send(
            sent.method, sent.path, sent.query, sent.header_lines, sent.body
        )
        if span is not None:
            span.note("http.response.status_code", answer.status)
    except FAILURES as exc:
        reason = failure_reason(exc)
        if span is not None:
            span.note("gateway.reason", reason.phrase)
        raise Rejected(reason) from None
    finally:
        timings.observe(perf_counter() - started)
        if span is not None:
            span.end()
    return answer


def with_traceparent(lines: list[bytes], traceparent: str) -> list[bytes]:
    """The header lines with `traceparent` in place of the client's."""
    kept = [line for line in lines if line.partition(b":")[0].strip().lower() != b"traceparent"]
    kept.append(b"traceparent: " + traceparent.encode())
    return kept


def relayed(
    answer: Answer, exchange: Exchange, checked: Checked, now: float, within_seconds: float
) -> Response:
    """The upstream's answer with the gateway's own headers: the request id, CORS, and a
    warning when the token is about to expire. A body past the buffer is relayed as it comes,
    and the client that stops reading it is cut after `within_seconds`."""
    exchange.upstream_status = answer.status
    owned = [("X-Request-Id", exchange.request_id)]
    if exchange.cors_headers:
        owned += exchange.cors_headers.items()
    verified = checked.attempt.verified
    if verified is not None:
        project: Project | None = exchange.project
        assert project is not None
        expires_in = token_exp(verified) - now
        if expires_in <= project.expiry_warning_seconds:
            owned.append(("X-Auth-Warning", "TOKEN_ABOUT_TO_EXPIRE"))
            owned.append(("X-Auth-Token-Expires-In", str(max(0, math.floor(expires_in)))))
    response = Response(answer.status, response_headers(answer.head, owned), answer.body)
    if answer.rest is not None:
        response.stream = Streamed(answer.rest, within_seconds)
    return response
