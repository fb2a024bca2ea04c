"""Every metric in one place (SPEC §6), with children bound once per config.

Label values are bounded: routes and projects come from the config (`_none` for requests no route
matched, `_other` for projects not listed), codes and decisions from closed enums, statuses from
HTTP. A request only looks children up in dicts built here, or at most once per new status.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import __version__

NO_ROUTE = "_none"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    """The metric families of one gateway process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route, project and status.",
            ["route", "project", "status"],
            registry=r,
        )
        self.auth_decisions = Counter(
            "gateway_auth_decisions_total",
            "Authentication decisions; `would_reject` is what `monitor` forwarded anyway.",
            ["project", "mode", "decision", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request's arrival to the answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Time the tracking API took to answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Requests the tracking API could not answer, by kind.",
            ["kind"],
            registry=r,
        )
        self.session_limited = Counter(
            "gateway_session_limited_total",
            "Token failures answered 429 because their session passed the threshold.",
            ["project"],
            registry=r,
        )
        self.counter_errors = Counter(
            "gateway_failure_counter_errors_total",
            "Failure-counter calls that failed or outran their budget.",
            ["backend"],
            registry=r,
        )
        self.counter_duration = Histogram(
            "gateway_failure_counter_duration_seconds",
            "Time a failure-counter increment took.",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total",
            "Config reloads, by result.",
            ["result"],
            registry=r,
        )
        self.key_uses = Counter(
            "gateway_auth_key_uses_total",
            "Verified requests by the key that verified them; a key at zero is safe to retire.",
            ["project", "kid"],
            registry=r,
        )
        self.token_cache = Counter(
            "gateway_verified_token_cache_total",
            "Verified-token cache lookups, by result.",
            ["result"],
            registry=r,
        )
        self.jwks_fetches = Counter(
            "gateway_jwks_fetches_total",
            "JWKS URL fetches, by project and result.",
            ["project", "result"],
            registry=r,
        )
        self.keys_loaded = Gauge(
            "gateway_keys_loaded",
            "Verification keys loaded, by project.",
            ["project"],
            registry=r,
            multiprocess_mode="max",
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being handled.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "The running gateway's version.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.upstream_error = {
            kind: self.upstream_errors.labels(kind) for kind in ("connect", "timeout", "other")
        }
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.cache_hit = self.token_cache.labels("hit")
        self.cache_miss = self.token_cache.labels("miss")

    def bind(self, routes: Iterable[str], projects: dict[str, str], keys: dict[str, list[str]],
             backend: str) -> BoundMetrics:  # fmt: skip
        """Children for one config: `projects` maps each label to its mode."""
        return BoundMetrics(self, list(routes), projects, keys, backend)


class BoundMetrics:
    """The children a request touches, looked up by plain dict access.

    Routes, projects and keys are bound here, at config load. Statuses come from the upstream
    and codes only with failures, so those children are bound on first use and kept.
    """

    def __init__(
        self,
        metrics: Metrics,
        routes: list[str],
        projects: dict[str, str],
        keys: dict[str, list[str]],
        backend: str,
    ) -> None:
        self.metrics = metrics
        self.request_duration = {r: metrics.request_duration.labels(r) for r in [*routes, NO_ROUTE]}
        self.upstream_duration = {r: metrics.upstream_duration.labels(r) for r in routes}
        self.key_uses = {
            (project, kid): metrics.key_uses.labels(project, kid)
            for project, kids in keys.items()
            for kid in kids
        }
        self.session_limited = {p: metrics.session_limited.labels(p) for p in projects}
        self.counter_errors = metrics.counter_errors.labels(backend)
        self.counter_duration = metrics.counter_duration.labels(backend)
        self._requests: dict[tuple[str, str, int], Counter] = {}
        self._decisions: dict[tuple[str, str, str, str], Counter] = {
            (project, mode, decision, ""): metrics.auth_decisions.labels(
                project, mode, decision, ""
            )
            for project, mode in projects.items()
            for decision in ("verified", "anonymous", "disabled")
        }
        for project, kids in keys.items():
            metrics.keys_loaded.labels(project).set(len(kids))

    def request(self, route: str, project: str, status: int) -> Counter:
        key = (route, project, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.requests.labels(route, project, str(status))
        return child

    def decision(self, project: str, mode: str, decision: str, code: str) -> Counter:
        key = (project, mode, decision, code)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.metrics.auth_decisions.labels(*key)
        return child
