"""What an answered request leaves behind: `observe` counts it in the metrics (requests by
route, project and status; the auth decision with its code; upstream errors by kind), and
`access_entry` is its access-log record, which never holds a query and cuts a path no route
matched to 32 characters (a token pasted into a path must not reach the log whole)."""

from __future__ import annotations

import time

import pytest

from gateway.config.compiled import CompiledConfig
from gateway.refusals.reasons import Reason
from gateway.stages.exchange import Exchange
from gateway.stages.record import access_entry, observe
from gateway.telemetry.metrics import BoundMetrics, Metrics
from tests.conftest import NOW
from tests.stages.support import EVENTS, PEER, bind, sample

UPSTREAM_KINDS = ("connect", "timeout", "other")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def bound(metrics: Metrics, config: CompiledConfig) -> BoundMetrics:
    return bind(metrics, config)


def routed(config: CompiledConfig, **fields: object) -> Exchange:
    """An exchange for a request to the events route of project `app`."""
    route, _ = config.router.match("POST", EVENTS)
    exchange = Exchange("req-1", route=route, project=config.project("app"))
    exchange.project_id = "app"
    for name, value in fields.items():
        setattr(exchange, name, value)
    return exchange


def upstream_errors(metrics: Metrics) -> dict[str, float]:
    """`gateway_upstream_errors_total` by kind, summed over its other labels."""
    metrics.flush()
    totals = dict.fromkeys(UPSTREAM_KINDS, 0.0)
    for family in metrics.registry.collect():
        for found in family.samples:
            if found.name == "gateway_upstream_errors_total":
                totals[found.labels["kind"]] += found.value
    return totals


# --- observe -----------------------------------------------------------------------------------


def test_an_answer_is_counted_by_route_project_and_status(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics
) -> None:
    observe(bound, metrics, routed(config), 202, time.perf_counter())
    labels = {"route": "track-events", "project": "app", "status": "202"}
    assert sample(metrics, "gateway_requests_total", labels) == 1
    timed = sample(metrics, "gateway_request_duration_seconds_count", {"route": "track-events"})
    assert timed == 1


def test_counts_reach_the_registry_only_when_flushed(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics
) -> None:
    observe(bound, metrics, routed(config), 202, time.perf_counter())
    labels = {"route": "track-events", "project": "app", "status": "202"}
    assert not metrics.registry.get_sample_value("gateway_requests_total", labels)
    metrics.flush()
    assert metrics.registry.get_sample_value("gateway_requests_total", labels) == 1


def test_an_unrouted_answer_is_counted_under_none(metrics: Metrics, bound: BoundMetrics) -> None:
    exchange = Exchange("req-1")
    exchange.reason = Reason.ROUTE_NOT_FOUND
    observe(bound, metrics, exchange, 404, 0.0)
    labels = {"route": "_none", "project": "_none", "status": "404"}
    assert sample(metrics, "gateway_requests_total", labels) == 1


def test_a_rejection_is_counted_with_its_code(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics
) -> None:
    exchange = routed(
        config,
        mode="required",
        decision="rejected",
        decision_reason=Reason.EXPIRED,
        reason=Reason.EXPIRED,
    )
    observe(bound, metrics, exchange, 401, time.perf_counter())
    labels = {"project": "app", "mode": "required", "decision": "rejected", "code": "TOKEN_EXPIRED"}
    assert sample(metrics, "gateway_auth_decisions_total", labels) == 1


def test_a_verified_decision_has_an_empty_code(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics
) -> None:
    exchange = routed(config, mode="required", decision="verified")
    observe(bound, metrics, exchange, 200, time.perf_counter())
    labels = {"project": "app", "mode": "required", "decision": "verified", "code": ""}
    assert sample(metrics, "gateway_auth_decisions_total", labels) == 1


def test_an_answer_without_a_decision_counts_none(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics
) -> None:
    """A refusal before the checks (a bad path, a body too large) is no auth decision."""
    exchange = routed(config, reason=Reason.BODY_TOO_LARGE)
    observe(bound, metrics, exchange, 413, time.perf_counter())
    metrics.flush()
    decisions = [
        s
        for family in metrics.registry.collect()
        if family.name == "gateway_auth_decisions"
        for s in family.samples
        if s.name == "gateway_auth_decisions_total" and s.value
    ]
    assert decisions == []


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (Reason.UPSTREAM_CONNECT, "connect"),
        (Reason.UPSTREAM_TIMEOUT, "timeout"),
        (Reason.UPSTREAM_BROKEN, "other"),
    ],
)
def test_upstream_errors_are_counted_by_kind(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics, reason: Reason, kind: str
) -> None:
    observe(bound, metrics, routed(config, reason=reason), 502, time.perf_counter())
    expected = {k: 1.0 if k == kind else 0.0 for k in UPSTREAM_KINDS}
    assert upstream_errors(metrics) == expected


def test_a_refusal_of_the_gateways_own_is_no_upstream_error(
    config: CompiledConfig, metrics: Metrics, bound: BoundMetrics
) -> None:
    exchange = routed(config, reason=Reason.KEYS_UNAVAILABLE)
    observe(bound, metrics, exchange, 503, time.perf_counter())
    assert upstream_errors(metrics) == dict.fromkeys(UPSTREAM_KINDS, 0.0)


# --- access_entry ------------------------------------------------------------------------------


def test_a_routed_request_is_recorded_with_what_was_decided(config: CompiledConfig) -> None:
    exchange = routed(
        config,
        mode="required",
        decision="verified",
        upstream_status=200,
        client="192.0.2.1",
        token_fingerprint="0123456789ab",
    )
    started = time.perf_counter() - 0.25
    entry = access_entry("POST", EVENTS, PEER, exchange, 200, started, NOW + 0.5)
    assert 250 <= entry["duration_ms"] < 60_000
    expected = {
        "time": "2030-03-17T17:46:40.500Z",
        "request_id": "req-1",
        "route": "track-events",
        "project": "app",
        "method": "POST",
        "path": EVENTS,
        "status": 200,
        "mode": "required",
        "decision": "verified",
        "code": None,
        "reason": None,
        "upstream_status": 200,
        "client": "192.0.2.1",
        "token_sha256": "0123456789ab",
    }
    assert {name: entry.get(name) for name in expected} == expected


def test_the_query_never_reaches_the_log(config: CompiledConfig) -> None:
    entry = access_entry("POST", f"{EVENTS}?token=eyJhbGciOi", PEER, routed(config), 200, 0.0, NOW)
    assert entry["path"] == EVENTS


def test_an_unrouted_path_is_cut_to_32_characters_without_its_query() -> None:
    raw = "/v1/" + "eyJhbGciOiJSUzI1NiJ9" * 5 + "?token=abc"
    entry = access_entry("GET", raw, PEER, Exchange("req-1"), 404, 0.0, NOW)
    assert entry["path"] == raw[:32]
    assert entry["route"] == "_none"


def test_a_short_unrouted_path_loses_its_query_too() -> None:
    entry = access_entry("GET", "/x?token=abc", PEER, Exchange("req-1"), 404, 0.0, NOW)
    assert entry["path"] == "/x"


def test_a_routed_path_is_cut_to_128_characters(config: CompiledConfig) -> None:
    raw = "/track/v2/projects/" + "p" * 200 + "/customers/events"
    entry = access_entry("POST", raw, PEER, routed(config), 200, 0.0, NOW)
    assert entry["path"] == raw[:128]


def test_an_unparsable_request_has_no_method_or_path() -> None:
    exchange = Exchange("req-1", parsed=False)
    exchange.reason = Reason.HTTP_MALFORMED
    entry = access_entry(None, "", PEER, exchange, 400, 0.0, NOW)
    assert (entry["method"], entry["path"]) == (None, None)
    assert (entry["code"], entry["reason"]) == ("BAD_REQUEST", "http_malformed")


def test_the_client_is_the_peer_when_no_stage_named_one(config: CompiledConfig) -> None:
    entry = access_entry("POST", EVENTS, PEER, routed(config), 200, 0.0, NOW)
    assert entry["client"] == PEER


def test_a_limited_session_is_recorded_with_the_429s_code(config: CompiledConfig) -> None:
    exchange = routed(config, reason=Reason.SESSION_LIMITED, decision="rejected")
    entry = access_entry("POST", EVENTS, PEER, exchange, 429, 0.0, NOW)
    assert (entry["code"], entry["reason"]) == ("AUTH_FAILURE_LIMIT", "session_limited")
