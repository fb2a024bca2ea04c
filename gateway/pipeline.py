"""The request path, in the contract's order: from a parsed request to its answer.

    target (400) → route (404/405) → project → body (413) → checks: encoding (415), api_key
    (401), identity, session, token (400/401), keys (503), signature, claims, subject (401)
    → session limit (429) → upstream (502/504) → the upstream's answer, relayed.

`Pipeline.run` reads as that list: each stage is a function on plain values in its own module
under `gateway.stages`. This module calls them in order, keeps the per-config state (the
compiled config and its bound metrics), and records every answer in the metrics and the log.
"""

from __future__ import annotations

import logging
from contextvars import Token
from dataclasses import dataclass
from functools import partial
from typing import Final

from gateway.auth.extract import RequestParts, collect_headers
from gateway.auth.jwks import JwksRefresher
from gateway.auth.verified import token_kid
from gateway.base import traced
from gateway.base.clock import Clock, perf_counter
from gateway.base.traced import SpanOpener
from gateway.config.compiled import CompiledConfig
from gateway.config.projects import Project
from gateway.counters import FailureCounter, session_hint, session_key
from gateway.forwarding.upstream import Upstream, relay_failure_reason
from gateway.http.handler import ConnectionLimits
from gateway.http.messages import Request, Response, new_request_id
from gateway.refusals.reasons import MethodNotAllowed, Reason, Rejected
from gateway.stages.authenticate import AuthStatus, Checked, CheckInputs, check
from gateway.stages.body import body_at_hand, read_body, read_json
from gateway.stages.cors import cors_headers, preflight
from gateway.stages.exchange import Exchange, request_id
from gateway.stages.forward import exchange_with, outgoing, relayed
from gateway.stages.project import project_id
from gateway.stages.record import access_entry, observe
from gateway.stages.refuse import refusal
from gateway.stages.session import client_of, count_failure, session_of
from gateway.stages.target import read_target
from gateway.telemetry.logs import AccessLog
from gateway.telemetry.metrics import BoundMetrics, Metrics
from gateway.telemetry.tracing import Tracing, end_server_span

log: Final = logging.getLogger("gateway.server")

JWKS_URL_KID: Final = "_jwks_url"  # the key label of every key fetched from a JWKS URL


@dataclass(frozen=True, slots=True)
class Serving:
    """What a request is served with, from start to end even across a reload: the compiled
    config, its bound metrics and the upstreams its routes name."""

    config: CompiledConfig
    bound: BoundMetrics
    upstreams: dict[str, Upstream]


class Pipeline:
    """The public listener's handler (`gateway.http.handler.Handler`)."""

    def __init__(
        self,
        config: CompiledConfig,
        *,
        clock: Clock,
        counter: FailureCounter,
        upstreams: dict[str, Upstream],
        access_log: AccessLog,
        metrics: Metrics,
        jwks: JwksRefresher,
        tracing: Tracing | None = None,
    ) -> None:
        self.jwks = jwks
        self.tracing = tracing
        self.clock = clock
        self.counter = counter
        self.access_log = access_log
        self.metrics = metrics
        self.stopping = False
        self.apply(config, upstreams)

    def apply(self, config: CompiledConfig, upstreams: dict[str, Upstream]) -> None:
        """Serve `config` with `upstreams` from the next request on; requests under way keep
        what they had."""
        projects = (*config.projects.values(), config.other_projects)
        bound = self.metrics.bind(
            [entry.route.name for entry in config.router.entries],
            {p.label: p.mode for p in projects},
            {
                p.label: [k.kid for k in p.keys.static] + ([JWKS_URL_KID] if p.keys.jwks else [])
                for p in projects
            },
            self.counter.backend,
        )
        self.serving = Serving(config, bound, upstreams)
        self.metrics.count_upstream_errors(upstreams)
        settings = config.settings.limits
        self.limits = ConnectionLimits(
            max_field_bytes=max(8190, settings.max_token_bytes + 1024),
            max_body_bytes=settings.max_body_bytes,
            max_connections=settings.max_client_connections,
            idle_timeout_seconds=settings.idle_timeout_seconds,
        )
        self.jwks.watch({p.label: p.keys for p in projects})

    @property
    def config(self) -> CompiledConfig:
        return self.serving.config

    # --- what the listener calls -----------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        started = perf_counter()
        exchange = Exchange(request_id(request))
        serving = self.serving
        bound = serving.bound
        self.metrics.requests_in_flight += 1
        traced_by = None if self.tracing is None else _trace(self.tracing, request, exchange)
        try:
            response = await self.run(request, serving, exchange)
        except Rejected as refused:
            if exchange.authenticating and exchange.decision is None:
                exchange.decision, exchange.decision_reason = "rejected", refused.reason
            allow = refused.allow if isinstance(refused, MethodNotAllowed) else None
            response = refusal(refused.reason, exchange, allow=allow)
        except BaseException:
            self.metrics.requests_in_flight -= 1
            if exchange.span is not None:
                exchange.span.end()
            raise
        finally:
            if traced_by is not None:
                traced.current.reset(traced_by)
        if response.stream is None:
            self._answered(request, bound, exchange, response.status, started)
        else:  # recorded once the rest has been relayed, or has broken
            record = partial(self._relayed, request, bound, exchange, response.status, started)
            response.stream.finished = record
        return response

    def unparsable(self, remote: str | None, error: str, *, version_unsupported: bool) -> Response:
        exchange = Exchange(new_request_id(), parsed=False)
        log.info(
            "unparsable request",
            extra={"fields": {"request_id": exchange.request_id, "error": error}},
        )
        reason = Reason.HTTP_VERSION_UNSUPPORTED if version_unsupported else Reason.HTTP_MALFORMED
        response = refusal(reason, exchange)
        started = perf_counter()
        self._record(None, "", remote, self.serving.bound, exchange, response.status, started)
        return response

    def failed(self) -> Response:
        exchange = Exchange(new_request_id())
        log.exception(
            "request failed inside the gateway",
            extra={"fields": {"request_id": exchange.request_id}},
        )
        return refusal(Reason.INTERNAL, exchange)

    # --- the stages, in order --------------------------------------------------------------------

    async def run(self, request: Request, serving: Serving, exchange: Exchange) -> Response:
        if self.stopping:
            raise Rejected(Reason.SHUTTING_DOWN)
        config, bound = serving.config, serving.bound
        exchange.client = client_of(request, config.trusted_proxies)  # logged with any refusal
        target = read_target(request)
        if request.method == "OPTIONS" and (answered := preflight(request, config.router, target)):
            return answered
        route, params = config.router.match(request.method, target.path)
        exchange.route, exchange.cors_headers = route, cors_headers(route, request)
        headers = collect_headers(request.header_keys(), request.raw_headers, route.watched_headers)
        parts = RequestParts(headers, {})
        exchange.project_id = project_id(route, params, parts)
        exchange.project = project = config.project(exchange.project_id)
        limits = config.settings.limits
        body = body_at_hand(request, limits)
        if body is None:
            body = await read_body(request, limits)
        exchange.mode = mode = project.mode if route.sdk_jwt else "disabled"
        exchange.authenticating = True
        reading = None
        if mode != "disabled" and route.reads_json and body:
            reading = await read_json(request, route, body, limits)
        checked = check(route, project, parts, target, body, reading, limits, mode)
        if checked.failure is Reason.KID_UNKNOWN and project.keys.jwks is not None:
            checks: CheckInputs = (route, project, parts, target, body, reading, limits, mode)
            checked = await self._with_fresh_keys(project, checked, checks)
        exchange.token_fingerprint = checked.token_fingerprint
        if checked.failure is None:
            self._verified(bound, exchange, checked)
            status = checked.status
        elif refused := await self._failed(config, bound, exchange, checked):
            return refused
        else:
            status = AuthStatus.UNVERIFIED  # `monitor`: forwarded, marked
        sent = outgoing(request, target, exchange, checked, status, config)
        upstream = serving.upstreams[route.upstream]
        answer = await exchange_with(upstream, sent, bound.upstream_duration[route.name])
        timeout = upstream.settings.timeout_seconds  # the route's upstream's, for its stream
        return relayed(answer, exchange, checked, self.clock.now(), timeout)

    async def _with_fresh_keys(
        self, project: Project, checked: Checked, checks: CheckInputs
    ) -> Checked:
        """The token names a key the project's JWKS did not have (keys rotate): the checks once
        more with a fresh key set."""
        if await self.jwks.refetch(project.label, project.keys):
            return check(*checks)
        if not project.keys.fetched_once:
            # The kid may be in the key set we could never read: our fault, not the token's.
            checked.failure = Reason.KEYS_UNAVAILABLE
        return checked

    def _verified(self, bound: BoundMetrics, exchange: Exchange, checked: Checked) -> None:
        """Anonymous, disabled or verified: a verified token's key is counted, and its
        session's failures are reset."""
        exchange.decision = checked.status
        attempt, project = checked.attempt, exchange.project
        if attempt.verified is None or project is None:
            return
        # Keys fetched from a JWKS URL share one label: their ids are not the config's.
        key_use = bound.key_uses.get((project.label, token_kid(attempt.verified)))
        (key_use or bound.key_uses[project.label, JWKS_URL_KID]).inc()
        session = session_of(project, exchange.project_id or "", attempt, exchange.client)
        if self.counter.may_hold(session_hint(session)):
            self.counter.reset(session_key(*session))

    async def _failed(
        self, config: CompiledConfig, bound: BoundMetrics, exchange: Exchange, checked: Checked
    ) -> Response | None:
        """A check failed: counted against the session when it is a token failure; refused
        in `required` (429 once the session is past its threshold), else None (`monitor`)."""
        failure, attempt, project = checked.failure, checked.attempt, exchange.project
        assert failure is not None
        assert project is not None
        exchange.reason = exchange.decision_reason = failure
        limited = None
        if failure.code.counts_for_session:
            session = session_of(project, exchange.project_id or "", attempt, exchange.client)
            threshold = config.settings.failure_counter.threshold
            limited = await count_failure(self.counter, session, threshold, bound.counter_duration)
        if exchange.mode != "required":
            exchange.decision = "would_reject"
            return None
        exchange.decision = "rejected"
        if limited is None:
            return refusal(failure, exchange)
        bound.session_limited[project.label].inc()
        return refusal(Reason.SESSION_LIMITED, exchange, cause=failure, retry_after=limited)

    # --- records ---------------------------------------------------------------------------------

    def _answered(
        self,
        request: Request,
        bound: BoundMetrics,
        exchange: Exchange,
        status: int,
        started: float,
    ) -> None:
        self.metrics.requests_in_flight -= 1
        self._record(
            request.method, request.raw_path, request.remote, bound, exchange, status, started
        )

    def _relayed(
        self,
        request: Request,
        bound: BoundMetrics,
        exchange: Exchange,
        status: int,
        started: float,
        error: BaseException | None,
    ) -> None:
        """An answer relayed as it arrived has ended: whole, or cut (the connection then
        closed with a reset, so a truncated body never looks complete)."""
        if error is not None:
            exchange.reason = relay_failure_reason(error)
            if exchange.reason is Reason.INTERNAL:
                log.error("relaying an answer failed", exc_info=error)
        self._answered(request, bound, exchange, status, started)

    def _record(
        self,
        method: str | None,
        raw_path: str,
        remote: str | None,
        bound: BoundMetrics,
        exchange: Exchange,
        status: int,
        started: float,
    ) -> None:
        observe(bound, self.metrics, exchange, status, started)
        if exchange.span is not None:
            end_server_span(exchange.span, exchange, status)
        if self.access_log.enabled:
            entry = access_entry(
                method, raw_path, remote, exchange, status, started, self.clock.now()
            )
            self.access_log.write(entry)


def _trace(
    tracing: Tracing, request: Request, exchange: Exchange
) -> Token[SpanOpener | None] | None:
    """The request's server span, if it is traced; the spans of the work inside it are its
    children until `Pipeline.handle` resets what this returns."""
    traceparent = request.header("traceparent")
    span = tracing.start(traceparent, traceparent and request.header("tracestate"))
    if span is None:
        return None
    exchange.span = span
    return traced.current.set(tracing.opener(span))
