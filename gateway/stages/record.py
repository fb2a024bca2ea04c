"""What each answered request leaves behind: its metrics and its access-log record."""

from __future__ import annotations

from typing import Any

from gateway.base.clock import perf_counter
from gateway.stages.exchange import Exchange
from gateway.telemetry.logs import utc_timestamp
from gateway.telemetry.metrics import NO_ROUTE, BoundMetrics, Metrics


def observe(
    bound: BoundMetrics, metrics: Metrics, exchange: Exchange, status: int, started: float
) -> None:
    route, project, reason = exchange.route, exchange.project, exchange.reason
    route_label = route.name if route else NO_ROUTE
    project_label = project.label if project else NO_ROUTE
    bound.request(route_label, project_label, status).inc()
    bound.request_duration[route_label].observe(perf_counter() - started)
    if exchange.decision is not None:
        failure = exchange.decision_reason
        code = failure.code.name if failure else ""
        bound.decision(project_label, exchange.mode, exchange.decision, code).inc()
    if reason is not None and reason.upstream_error is not None and route is not None:
        metrics.upstream_error_for(route.upstream, reason).inc()


def _loggable_path(raw: str, exchange: Exchange) -> str | None:
    """The path without its query, cut short where it matched no route: a token pasted into
    a path must not reach the log whole (32 characters never reach a JWT's claims)."""
    if not exchange.parsed:
        return None
    return raw.partition("?")[0][: 128 if exchange.route else 32]


def access_entry(
    method: str | None,
    raw_path: str,
    remote: str | None,
    exchange: Exchange,
    status: int,
    started: float,
    now: float,
) -> dict[str, Any]:
    route, project, reason = exchange.route, exchange.project, exchange.reason
    return {
        "time": utc_timestamp(now),
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
        "duration_ms": int((perf_counter() - started) * 1e6) / 1000,
        "upstream": route.upstream if route else None,
        "upstream_status": exchange.upstream_status,
        "client": exchange.client or remote,
        "token_sha256": exchange.token_fingerprint,
    }
