"""The admin listener's /metrics: every documented family, moving with the right labels."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.metrics import LATENCY_BUCKETS, Tally, Timings
from tests.conftest import GatewayFactory, RunningGateway, Tokens

EVENTS = "/track/v2/projects/app/customers/events"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: aiohttp.ClientSession, gateway: RunningGateway) -> Samples:
    async with http.get(gateway.admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def post(
    http: aiohttp.ClientSession, gateway: RunningGateway, body: Any, headers: dict[str, str]
) -> int:
    all_headers = {"Content-Type": "application/json", **headers}
    async with http.post(gateway.url + EVENTS, data=json.dumps(body), headers=all_headers) as r:
        return r.status


async def test_requests_decisions_and_key_uses_are_counted(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    identified = {"customer_ids": {"registered": "alice"}}
    token = tokens.good()
    assert await post(http, gateway, identified, {"X-Sdk-Auth-Token": token}) == 200
    assert await post(http, gateway, identified, {"X-Sdk-Auth-Token": token}) == 200
    assert await post(http, gateway, identified, {"X-Sdk-Auth-Token": tokens.expired()}) == 401
    assert await post(http, gateway, {"customer_ids": {"cookie": "c"}}, {}) == 200
    async with http.get(gateway.url + "/nowhere/at/all") as response:
        assert response.status == 404
    samples = await scrape(http, gateway)
    route = "track-events"
    assert value(samples, "gateway_requests_total", route=route, project="app", status="200") == 3
    assert value(samples, "gateway_requests_total", route=route, project="app", status="401") == 1
    assert value(samples, "gateway_requests_total", route="_none", project="_none", status="404")
    decisions = "gateway_auth_decisions_total"
    assert value(samples, decisions, project="app", mode="required", decision="verified", code="")
    assert (
        value(
            samples,
            decisions,
            project="app",
            mode="required",
            decision="rejected",
            code="TOKEN_EXPIRED",
        )
        == 1
    )
    assert value(samples, decisions, project="app", mode="required", decision="anonymous", code="")
    assert value(samples, "gateway_auth_key_uses_total", project="app", kid="key-a") == 2
    assert value(samples, "gateway_verified_token_cache_total", result="hit") == 1
    assert value(samples, "gateway_verified_token_cache_total", result="miss") == 2
    assert value(samples, "gateway_request_duration_seconds_count", route=route) == 4
    assert value(samples, "gateway_upstream_duration_seconds_count", route=route) == 3
    assert value(samples, "gateway_keys_loaded", project="app") == 1
    assert value(samples, "gateway_build_info", version="0.1.0") == 1
    assert value(samples, "gateway_requests_in_flight") == 0
    for kind in ("connect", "timeout", "other"):
        labels = (("kind", kind), ("upstream", "default"))
        assert ("gateway_upstream_errors_total", labels) in samples


async def test_unknown_projects_are_one_label(
    http: aiohttp.ClientSession, gateway: RunningGateway
) -> None:
    for project in ("p1", "p2", "p3"):
        path = f"/track/v2/projects/{project}/customers/events"
        async with http.post(gateway.url + path, data=b"{}") as response:
            assert response.status == 200
    samples = await scrape(http, gateway)
    labels = {
        dict(labels).get("project") for (name, labels) in samples if "project" in dict(labels)
    }
    assert "_other" in labels
    assert not labels & {"p1", "p2", "p3"}
    requests = value(
        samples, "gateway_requests_total", route="track-events", project="_other", status="200"
    )
    assert requests == 3


async def test_monitor_shows_what_required_would_reject(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    def monitor(config: dict[str, Any]) -> None:
        config["projects"]["app"]["mode"] = "monitor"

    gateway = await make_gateway(monitor)
    identified = {"customer_ids": {"registered": "alice"}}
    for headers in (
        {"X-Sdk-Auth-Token": tokens.good()},
        {"X-Sdk-Auth-Token": tokens.good()},
        {"X-Sdk-Auth-Token": tokens.good()},
        {"X-Sdk-Auth-Token": tokens.expired()},
        {},
    ):
        assert await post(http, gateway, identified, headers) == 200
    samples = await scrape(http, gateway)
    decisions = "gateway_auth_decisions_total"
    base = {"project": "app", "mode": "monitor"}
    verified = value(samples, decisions, **base, decision="verified", code="")
    expired = value(samples, decisions, **base, decision="would_reject", code="TOKEN_EXPIRED")
    missing = value(samples, decisions, **base, decision="would_reject", code="TOKEN_NOT_PROVIDED")
    assert (verified, expired, missing) == (3, 1, 1)
    # The rollout number: the share of identified traffic `required` would reject.
    assert (expired + missing) / (verified + expired + missing) == 0.4


async def test_session_limits_upstream_errors_and_reloads_are_counted(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    gateway = await make_gateway(
        failure_counter={"threshold": 1},
        upstream={"url": "http://127.0.0.1:9", "timeout_seconds": 2},
    )
    identified = {"customer_ids": {"registered": "alice"}}
    statuses = [
        await post(http, gateway, identified, {"X-Session-Id": "s", "X-Sdk-Auth-Token": "x"})
        for _ in range(3)
    ]
    assert statuses == [401, 429, 429]
    assert await post(http, gateway, {"customer_ids": {"cookie": "c"}}, {}) == 502
    async with http.post(gateway.admin_url + "/-/reload") as response:
        assert response.status == 200
    samples = await scrape(http, gateway)
    assert value(samples, "gateway_session_limited_total", project="app") == 2
    connect_errors = value(
        samples, "gateway_upstream_errors_total", upstream="default", kind="connect"
    )
    assert connect_errors == 1
    # The decision's code is the auth outcome, not the upstream failure that followed it.
    anonymous = {"project": "app", "mode": "required", "decision": "anonymous"}
    assert value(samples, "gateway_auth_decisions_total", **anonymous, code="") == 1
    upstream_coded = value(
        samples, "gateway_auth_decisions_total", **anonymous, code="UPSTREAM_UNAVAILABLE"
    )
    assert upstream_coded == 0
    assert value(samples, "gateway_config_reloads_total", result="success") == 1
    assert value(samples, "gateway_config_reloads_total", result="failure") == 0
    assert value(samples, "gateway_failure_counter_duration_seconds_count", backend="memory") == 3


async def test_metrics_are_not_on_the_public_listener(
    http: aiohttp.ClientSession, gateway: RunningGateway
) -> None:
    async with http.get(gateway.url + "/metrics") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "ROUTE_NOT_FOUND"


def test_recorders_flush_exactly_what_direct_observations_give() -> None:
    """Values on, just under and past every bucket bound land where prometheus-client puts
    them, and a flush adds each count once (a second flush adds nothing)."""
    values = [b + d for b in LATENCY_BUCKETS for d in (-1e-9, 0.0, 1e-9)] + [0.0, 99.0]
    direct, batched = CollectorRegistry(), CollectorRegistry()
    histograms = [Histogram("t_seconds", "t", buckets=LATENCY_BUCKETS, registry=r)
                  for r in (direct, batched)]  # fmt: skip
    counters = [Counter("n", "n", registry=r) for r in (direct, batched)]
    timings, tally = Timings(histograms[1]), Tally(counters[1])
    for value in values:
        histograms[0].observe(value)
        counters[0].inc()
        timings.observe(value)
        tally.inc()

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        # `_created` is each registry's own creation time: not what is compared here.
        text = generate_latest(registry).decode()
        return {
            (s.name, json.dumps(s.labels, sort_keys=True)): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(batched) != samples(direct)  # nothing until flushed
    for _ in range(2):
        timings.flush()
        tally.flush()
    assert samples(batched) == samples(direct)
