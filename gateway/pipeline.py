"""The pipeline, in the contract's order: from a parsed request to its answer.

    path (400) → route (404/405) → project → size (413) → encoding (415) → api_key (401)
    → identity, session, token (400/401) → keys (503) → signature, claims, subject (401)
    → session limit (429) → upstream (502/504) → the upstream's answer, relayed.

Each stage is a plain function in its own module; this one reads the request, calls them in
order, and turns their results into a response and an access-log record.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from gateway.auth.body import NOT_READ, THREAD_BYTES, JsonBody, read_json_body
from gateway.auth.extract import RequestParts, collect_headers, parse_query
from gateway.auth.jwks import JwksRefresher
from gateway.auth.subject import identity_key
from gateway.base.clock import Clock
from gateway.config.compiled import CompiledConfig
from gateway.config.projects import Project
from gateway.config.router import MethodNotAllowed, Target, parse_target
from gateway.config.routes import ProjectFixed, ProjectFromHeader, Route
from gateway.config.settings import LimitsSettings
from gateway.counters import FailureCounter, Session, session_hint, session_key
from gateway.forwarding.headers import (
    Forwarding,
    Upstream,
    client_address,
    forward_headers,
    is_trusted,
    response_headers,
    strip_query,
)
from gateway.http.client import UPSTREAM_FAILURES
from gateway.http.messages import Request, Response, date_line, header_lines, new_request_id
from gateway.refusals.answers import ErrorFormat, render_error
from gateway.refusals.reasons import Code, Reason, Rejected
from gateway.stages.authenticate import Attempt, AuthStatus, authenticate, check_api_key
from gateway.telemetry.logs import AccessLog, utc_timestamp
from gateway.telemetry.metrics import NO_ROUTE, BoundMetrics, Metrics

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UPSTREAM_ERROR_KINDS = {
    Reason.UPSTREAM_CONNECT: "connect",
    Reason.UPSTREAM_TIMEOUT: "timeout",
    Reason.UPSTREAM_BROKEN: "other",
}
# Methods whose bodies many servers never read: such a body would be taken for the next request
# on the upstream connection, one the gateway never checked.
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
JWKS_URL_KID = "_jwks_url"
UPSTREAM_RETRY_AFTER_SECONDS = 1
KEYS_RETRY_AFTER_SECONDS = 5


def _loggable_path(raw: str, exchange: Exchange) -> str | None:
    """The path without its query, cut short where it matched no route: a token pasted into
    a path must not reach the log whole (32 characters never reach a JWT's claims)."""
    if not exchange.parsed:
        return None
    return raw.partition("?")[0][: 128 if exchange.route else 32]


@dataclass(slots=True)
class Exchange:
    """What one request became, for its answer and its access-log record."""

    request_id: str
    route: Route | None = None
    project: Project | None = None
    project_id: str | None = None
    mode: str = "disabled"
    decision: str | None = None
    decision_reason: Reason | None = None  # why auth refused (or would have): the metric's code
    reason: Reason | None = None  # why the answer is an error, whatever stage gave it
    upstream_status: int | None = None
    client: str | None = None
    cors_headers: dict[str, str] | None = None  # for an Origin the route's `cors` lists
    token_fingerprint: str | None = None  # 12 hex digits of the token's SHA-256, for the log
    parsed: bool = True  # False: the HTTP parser refused it; method and path are unknown
    authenticating: bool = False  # past route and size checks: a refusal is an auth decision


@dataclass(slots=True)
class Checked:
    """What the checks made of a request: the body to forward and the auth outcome."""

    body: bytes
    decoded: bool = False
    status: str = AuthStatus.DISABLED
    attempt: Attempt = field(default_factory=Attempt)
    failure: Reason | None = None


class Gateway:
    def __init__(
        self,
        config: CompiledConfig,
        *,
        clock: Clock,
        counter: FailureCounter,
        upstream: Upstream,
        access_log: AccessLog,
        metrics: Metrics,
        jwks: JwksRefresher,
    ) -> None:
        self.jwks = jwks
        self.clock = clock
        self.counter = counter
        self.upstream = upstream
        self.access_log = access_log
        self.metrics = metrics
        self.stopping = False
        self.apply(config)

    def apply(self, config: CompiledConfig) -> None:
        """Serve `config` from the next request on; requests under way keep the one they had."""
        self.bound = self.metrics.bind(
            [entry.route.name for entry in config.router.entries],
            {p.label: p.mode for p in (*config.projects.values(), config.other_projects)},
            {
                p.label: [k.kid for k in p.keys.static] + ([JWKS_URL_KID] if p.keys.jwks else [])
                for p in (*config.projects.values(), config.other_projects)
            },
            self.counter.backend,
        )
        self.config = config
        self.limits = config.settings.limits
        self.jwks.watch(
            {p.label: p.keys for p in (*config.projects.values(), config.other_projects)}
        )

    # --- the handler ---------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        incoming_id = request.header("x-request-id")
        exchange = Exchange(
            incoming_id
            if incoming_id is not None and _REQUEST_ID.fullmatch(incoming_id)
            else new_request_id()
        )
        # One config (and its bound metrics) for the whole request, even across a reload.
        config, bound = self.config, self.bound
        metrics = self.metrics
        metrics.requests_in_flight += 1
        try:
            response = await self._process(request, config, bound, exchange)
        except MethodNotAllowed as refused:
            response = self._refuse(exchange, refused.reason, allow=refused.allow)
        except Rejected as refused:
            if exchange.authenticating and exchange.decision is None:
                exchange.decision, exchange.decision_reason = "rejected", refused.reason
            response = self._refuse(exchange, refused.reason)
        finally:
            metrics.requests_in_flight -= 1
        self._observe(bound, exchange, response.status, started)
        self._log(
            request.method, request.raw_path, request.remote, exchange, response.status, started
        )
        return response

    def protocol_error(
        self, remote: str | None, reason: Reason, request_id: str, status: int
    ) -> None:
        """A request the HTTP parser refused before any handler ran: counted and logged too."""
        exchange = Exchange(request_id, reason=reason, parsed=False)
        started = time.perf_counter()
        self._observe(self.bound, exchange, status, started)
        self._log(None, "", remote, exchange, status, started)

    def _observe(
        self, bound: BoundMetrics, exchange: Exchange, status: int, started: float
    ) -> None:
        route, project, reason = exchange.route, exchange.project, exchange.reason
        route_label = route.name if route else NO_ROUTE
        project_label = project.label if project else NO_ROUTE
        bound.request(route_label, project_label, status).inc()
        bound.request_duration[route_label].observe(time.perf_counter() - started)
        if exchange.decision is not None:
            failure = exchange.decision_reason
            code = failure.code.name if failure else ""
            bound.decision(project_label, exchange.mode, exchange.decision, code).inc()
        if reason in _UPSTREAM_ERROR_KINDS:
            self.metrics.upstream_error[_UPSTREAM_ERROR_KINDS[reason]].inc()

    async def _process(
        self,
        request: Request,
        config: CompiledConfig,
        bound: BoundMetrics,
        exchange: Exchange,
    ) -> Response:
        if self.stopping:
            raise Rejected(Reason.SHUTTING_DOWN)
        target = parse_target(request.raw_path)
        if request.method in _BODYLESS_METHODS and (
            request.content_length or request.header("transfer-encoding") is not None
        ):
            raise Rejected(Reason.BODY_NOT_ALLOWED)
        if request.method == "OPTIONS" and (preflight := self._preflight(request, config, target)):
            return preflight
        route, params = config.router.match(request.method, target.path)
        exchange.route = route
        if route.cors is not None:
            exchange.cors_headers = route.cors.answer_headers(request.header("origin"))
        keys = request.header_keys()
        parts = RequestParts(collect_headers(keys, request.raw_headers, route.watched_headers), {})
        project = self._resolve_project(config, route, params, parts, exchange)
        limits = config.settings.limits
        body = request.complete_body()
        if body is None or len(body) > limits.max_body_bytes:
            body = await self._read_body(request, limits)

        sdk_mode = project.mode if route.sdk_jwt else "disabled"
        exchange.mode = sdk_mode
        exchange.authenticating = True
        reading = (
            await self._read_json(request, route, body, limits)
            if sdk_mode != "disabled" and route.reads_json and body
            else None
        )
        checked = self._check(route, project, parts, target, body, reading, limits, sdk_mode)
        if checked.failure is Reason.KID_UNKNOWN and project.keys.jwks is not None:
            if await self.jwks.refetch(project.label, project.keys):
                checked = self._check(
                    route, project, parts, target, body, reading, limits, sdk_mode
                )
            elif not project.keys.fetched_once:
                # The kid may be in the key set we could never read: our fault, not the token's.
                checked.failure = Reason.KEYS_UNAVAILABLE
        status, attempt, failure = checked.status, checked.attempt, checked.failure
        if attempt.token is not None:
            exchange.token_fingerprint = attempt.token.digest[:6].hex()

        exchange.client = self._client(request, config)
        if failure is not None:
            exchange.reason = exchange.decision_reason = failure
            limited = await self._count_failure(config, bound, project, exchange, attempt, failure)
            if sdk_mode == "required":
                exchange.decision = "rejected"
                if limited is not None:
                    bound.session_limited[project.label].inc()
                    return self._refuse(exchange, failure, limited=True, retry_after=limited)
                return self._refuse(exchange, failure)
            status = AuthStatus.UNVERIFIED
            exchange.decision = "would_reject"
        else:
            exchange.decision = status
            if attempt.verified is not None:
                kid = attempt.verified.kid
                # Keys fetched from a JWKS URL share one label: their ids are not the config's.
                key_use = (
                    bound.key_uses.get((project.label, kid))
                    or bound.key_uses[project.label, JWKS_URL_KID]
                )
                key_use.inc()
                session = self._session(project, exchange, attempt)
                if self.counter.may_hold(session_hint(session)):
                    self.counter.reset(session_key(*session))

        return await self._forward(
            request, config, bound, target, exchange, status, attempt, checked.body, checked.decoded
        )

    @staticmethod
    def _check(
        route: Route,
        project: Project,
        parts: RequestParts,
        target: Target,
        body: bytes,
        reading: JsonBody | None,
        limits: LimitsSettings,
        sdk_mode: str,
    ) -> Checked:
        """Encoding, api_key, then sdk_jwt in the contract's order. Raises what every mode
        refuses; returns an sdk_jwt failure for the caller to count, refuse or forward."""
        checked = Checked(body)
        if reading is not None:
            checked.body, checked.decoded = reading.forwarded, reading.decoded
            refused = reading.encoding_refused
            if refused is not None:
                if sdk_mode == "required" or refused.code is Code.PAYLOAD_TOO_LARGE:
                    raise Rejected(refused)
                checked.failure = refused
        if route.api_key:
            check_api_key(project, parts)
        if sdk_mode == "disabled" or checked.failure is not None:
            return checked
        if reading is not None:
            checked.failure = reading.parse_refused
            if checked.failure is not None:
                return checked
            if reading.document is not NOT_READ:
                parts.body, parts.walked = reading.document, reading.walked
        try:
            if route.reads_query:
                parts.query = parse_query(target.query)
            checked.status = authenticate(
                route, project, parts, limits.max_token_bytes, checked.attempt
            )
        except Rejected as refused:
            checked.failure = refused.reason
        return checked

    async def _forward(
        self,
        request: Request,
        config: CompiledConfig,
        bound: BoundMetrics,
        target: Target,
        exchange: Exchange,
        status: str,
        attempt: Attempt,
        body: bytes,
        decoded: bool,
    ) -> Response:
        route, project = exchange.route, exchange.project
        assert route is not None
        assert project is not None
        verified = attempt.verified
        forwarding = Forwarding(
            request_id=exchange.request_id,
            auth_status=status,
            authenticated_user=project.subject.header(attempt.identity, verified.user)
            if verified
            else None,
            peer=request.remote,
            peer_trusted=is_trusted(request.remote, config.trusted_proxies),
            drop=route.token_header_drop | {"content-encoding"}
            if decoded
            else route.token_header_drop,
            token_scheme_drop=route.token_scheme_drop,
        )
        sent = time.perf_counter()
        try:
            answer = await self.upstream.send(
                request.method,
                target.path,
                strip_query(target.query, route.token_query_drop),
                forward_headers(request.header_keys(), request.raw_headers, forwarding),
                body,
            )
        except TimeoutError:
            raise Rejected(Reason.UPSTREAM_TIMEOUT) from None
        except UPSTREAM_FAILURES:
            raise Rejected(Reason.UPSTREAM_BROKEN) from None
        finally:
            bound.upstream_duration[route.name].observe(time.perf_counter() - sent)
        exchange.upstream_status = answer.status
        owned = [("X-Request-Id", exchange.request_id)]
        if exchange.cors_headers:
            owned += exchange.cors_headers.items()
        if verified is not None:
            expires_in = verified.exp - self.clock.now()
            if expires_in <= project.expiry_warning_seconds:
                owned.append(("X-Auth-Warning", "TOKEN_ABOUT_TO_EXPIRE"))
                owned.append(("X-Auth-Token-Expires-In", str(max(0, math.floor(expires_in)))))
        response = Response(answer.status, response_headers(answer.head, owned), answer.body)
        if answer.rest is not None:
            await self._stream(request, exchange, response, answer.rest)
        return response

    # --- stages that read the request's headers ------------------------------------------------

    @staticmethod
    def _preflight(request: Request, config: CompiledConfig, target: Target) -> Response | None:
        """A CORS preflight from a listed origin, answered without auth; anything else that
        uses OPTIONS is routed like any other method."""
        found = config.router.first_for_path(target.path)
        origin = request.header("origin")
        if found is None or found[0].cors is None or origin is None:
            return None
        route = found[0]
        assert route.cors is not None
        if origin not in route.cors.origins or not request.header_values(
            "access-control-request-method"
        ):
            return None
        headers = header_lines(route.cors.preflight_headers(origin).items())
        headers.append(date_line())
        return Response(204, headers)

    @staticmethod
    def _resolve_project(
        config: CompiledConfig,
        route: Route,
        params: dict[str, str],
        parts: RequestParts,
        exchange: Exchange,
    ) -> Project:
        source = route.project_from
        if isinstance(source, ProjectFixed):
            project_id = source.id
        elif isinstance(source, ProjectFromHeader):
            values = parts.headers.get(source.name)
            if not values or not values[0].strip():
                raise Rejected(Reason.PROJECT_HEADER_MISSING)
            if len(values) > 1:
                raise Rejected(Reason.PROJECT_HEADER_DUPLICATE)
            project_id = values[0].strip()
        else:
            project_id = params[source.group]
        project = config.project(project_id)
        exchange.project, exchange.project_id = project, project_id
        return project

    @staticmethod
    async def _read_body(request: Request, limits: LimitsSettings) -> bytes:
        declared = request.content_length
        if declared is not None and declared > limits.max_body_bytes:
            raise Rejected(Reason.BODY_TOO_LARGE)  # before `100 Continue`: nothing is sent
        return await request.body(limits.body_timeout_seconds)

    @staticmethod
    async def _read_json(
        request: Request, route: Route, body: bytes, limits: LimitsSettings
    ) -> JsonBody:
        """The body's one JSON reading; a large or compressed one is read on a worker thread
        (orjson and zlib hold the GIL only while they run; the strict decoder hands it over
        every few milliseconds), so the event loop keeps serving meanwhile."""
        encodings = request.header_values("content-encoding")
        reading = (
            body,
            request.header_values("content-type"),
            encodings,
            limits.max_decompressed_bytes,
        )
        if len(body) > THREAD_BYTES or encodings:
            # The walk to the route's JSON paths too: a batch of 20,000 events is 20,000 steps.
            return await asyncio.to_thread(read_json_body, *reading, route.json_paths)
        return read_json_body(*reading)

    @staticmethod
    def _client(request: Request, config: CompiledConfig) -> str | None:
        if not config.trusted_proxies:
            return request.remote
        return client_address(
            request.remote, request.header_values("x-forwarded-for"), config.trusted_proxies
        )

    # --- the failure counter -------------------------------------------------------------------

    @staticmethod
    def _session(project: Project, exchange: Exchange, attempt: Attempt) -> Session:
        project_id = (exchange.project_id or "").lower()
        if attempt.session_id is not None:
            return project.label, project_id, "session", attempt.session_id
        if attempt.identity is not None:
            return project.label, project_id, "user", identity_key(attempt.identity)
        return project.label, project_id, "client", exchange.client or ""

    async def _count_failure(
        self,
        config: CompiledConfig,
        bound: BoundMetrics,
        project: Project,
        exchange: Exchange,
        attempt: Attempt,
        failure: Reason,
    ) -> int | None:
        """Count a token failure against its session; the `Retry-After` of the 429 that
        `required` answers once the session is past its threshold, else None."""
        if not failure.code.counts_for_session:
            return None
        started = time.perf_counter()
        session = self._session(project, exchange, attempt)
        count = await self.counter.record_failure(session_key(*session))
        bound.counter_duration.observe(time.perf_counter() - started)
        if count is None or count.count <= config.settings.failure_counter.threshold:
            return None
        return count.retry_after

    # --- answers -------------------------------------------------------------------------------

    def _refuse(
        self,
        exchange: Exchange,
        reason: Reason,
        *,
        limited: bool = False,
        retry_after: int | None = None,
        allow: str | None = None,
    ) -> Response:
        # A limited session's answer is the 429 (logged as such); its body names the failure.
        exchange.reason = Reason.SESSION_LIMITED if limited else reason
        if retry_after is None and reason.code is Code.UPSTREAM_UNAVAILABLE:
            retry_after = UPSTREAM_RETRY_AFTER_SECONDS
        elif retry_after is None and reason.code is Code.KEYS_UNAVAILABLE:
            retry_after = KEYS_RETRY_AFTER_SECONDS
        route = exchange.route
        answer = render_error(
            reason,
            exchange.request_id,
            error_format=route.error_format if route else ErrorFormat.STANDARD,
            limited=limited,
            retry_after=retry_after,
            allow=allow,
        )
        owned = [*answer.headers.items(), ("X-Request-Id", exchange.request_id)]
        if exchange.cors_headers:
            owned += exchange.cors_headers.items()
        headers = header_lines(owned)
        headers.append(date_line())
        # The rest of a refused body is not read, only dropped for a moment before closing.
        close = reason.code in (Code.PAYLOAD_TOO_LARGE, Code.SHUTTING_DOWN) or reason in (
            Reason.HTTP_MALFORMED,
            Reason.BODY_TIMEOUT,
            Reason.BODY_NOT_ALLOWED,
        )
        return Response(answer.status, headers, answer.body, close=close)

    async def _stream(
        self,
        request: Request,
        exchange: Exchange,
        response: Response,
        rest: AsyncGenerator[bytes, None],
    ) -> None:
        """An answer past the buffer, relayed as it comes. If the upstream breaks now, the
        client's connection is cut, so a truncated body can never look complete; so is a
        client that stops reading for the upstream's timeout, which must not pin the upstream
        connection."""
        try:
            timeout = self.config.settings.upstream.timeout_seconds
            await request.channel.stream(response, rest, timeout)
        except (*UPSTREAM_FAILURES, TimeoutError):
            exchange.reason = Reason.UPSTREAM_BROKEN
            response.close = True
            request.channel.abort()
        finally:
            await rest.aclose()  # hands the connection back, or closes it

    def _log(
        self,
        method: str | None,
        raw_path: str,
        remote: str | None,
        exchange: Exchange,
        status: int,
        started: float,
    ) -> None:
        if not self.access_log.enabled:
            return
        route, project, reason = exchange.route, exchange.project, exchange.reason
        self.access_log.write(
            {
                "time": utc_timestamp(self.clock.now()),
                "request_id": exchange.request_id,
                "route": route.name if route else "_none",
                "project": project.label if project else None,
                "method": method if exchange.parsed else None,
                "path": _loggable_path(raw_path, exchange),
                "status": status,
                "mode": exchange.mode,
                "decision": exchange.decision,
                "code": reason.code.name if reason else None,
                "reason": reason.phrase if reason else None,
                # whole microseconds in milliseconds: round(x, 3) costs five times as much
                "duration_ms": int((time.perf_counter() - started) * 1e6) / 1000,
                "upstream_status": exchange.upstream_status,
                "client": exchange.client or remote,
                "token_sha256": exchange.token_fingerprint,
            }
        )
