"""Every metric in one place, with children bound once per config.

Label values are bounded: routes and projects come from the config (`_none` for requests no route
matched, `_other` for projects not listed), codes and decisions from closed enums, statuses from
HTTP. A request only looks children up in dicts built here, or at most once per new status.

What requests record goes into plain numbers (`Tally`, `Timings`) that `Metrics.flush` adds to
the prometheus-client children in one call each: before every scrape of this process, and every
`FLUSH_SECONDS` for `workers: N`, whose supervisor reads the children's files. A
prometheus-client increment takes a lock and checks its labels each time, several per request.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway import __version__
from gateway.refusals.reasons import Reason

NO_ROUTE: Final = "_none"
# A `Final` name: the compiled build calls it from a C static, not through the bisect module.
_first_bound_at_least: Final = bisect.bisect_left
FLUSH_SECONDS: Final = 0.5
LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Tally:
    """Increments of one counter child, added to it when metrics are flushed."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self.count = 0.0

    def inc(self, amount: float = 1) -> None:
        self.count += amount

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0.0
            self._child.inc(count)


class Timings:
    """Observations of one histogram child, counted per bucket here and added when flushed."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child: Any = child  # its buckets are prometheus-client internals: no annotations
        self._bounds: list[float] = list(self._child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= the value, as prometheus-client picks it.
        self._counts[_first_bound_at_least(self._bounds, seconds)] += 1
        self._sum += seconds

    def flush(self) -> None:
        if not any(self._counts):
            return
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        for bucket, count in zip(self._child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._child._sum.inc(total)


class Metrics:
    """The metric families of one gateway process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._recorders: dict[int, Tally | Timings] = {}  # by the child's id: one each
        self.requests_in_flight = 0
        self.open_client_connections = 0
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
            "Requests the tracking API could not answer, by upstream (`default` for `upstream`, "
            "else its name in `upstreams`) and kind.",
            ["upstream", "kind"],
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
        self.client_connections = Gauge(
            "gateway_client_connections",
            "Open client connections on the public listener.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_refused = Counter(
            "gateway_connections_refused_total",
            "Client connections closed at once: past `limits.max_client_connections` (limit), "
            "failing to be accepted, such as out of file descriptors (accept_error), or failing "
            "their TLS handshake (tls_handshake).",
            ["reason"],
            registry=r,
        )
        self.access_log_dropped = Counter(
            "gateway_access_log_dropped_lines_total",
            "Access-log lines dropped: stdout had fallen 4 MiB behind (nobody was reading it) "
            "or could not be written to.",
            registry=r,
        )
        self.build_info = Gauge(
            "gateway_build_info",
            "The running gateway's version.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.upstream_error: dict[tuple[str, Reason], Tally] = {}
        self.connections_refused_by = {
            reason: self.tally(self.connections_refused.labels(reason))
            for reason in ("limit", "accept_error", "tls_handshake")
        }
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.cache_hit = self.tally(self.token_cache.labels("hit"))
        self.cache_miss = self.tally(self.token_cache.labels("miss"))

    # --- what the public listener reports (gateway.http.handler.ConnectionCounts) -------------

    def connections_open(self, count: int) -> None:
        self.open_client_connections = count

    def connection_refused(self, reason: str) -> None:
        self.connections_refused_by[reason].inc()

    def count_upstream_errors(self, upstreams: Iterable[str]) -> None:
        """Every upstream's error series, there from the start at zero."""
        for name in upstreams:
            for reason in Reason:
                if reason.upstream_error is not None:
                    self.upstream_error_for(name, reason)

    def upstream_error_for(self, upstream: str, reason: Reason) -> Tally:
        key = (upstream, reason)
        tally = self.upstream_error.get(key)
        if tally is None:
            assert reason.upstream_error is not None
            child = self.upstream_errors.labels(upstream, reason.upstream_error)
            tally = self.upstream_error[key] = self.tally(child)
        return tally

    def tally(self, child: Counter) -> Tally:
        recorder = self._recorders.get(id(child))
        if recorder is None:
            recorder = self._recorders[id(child)] = Tally(child)
        assert isinstance(recorder, Tally)
        return recorder

    def timings(self, child: Histogram) -> Timings:
        recorder = self._recorders.get(id(child))
        if recorder is None:
            recorder = self._recorders[id(child)] = Timings(child)
        assert isinstance(recorder, Timings)
        return recorder

    def flush(self) -> None:
        """Adds what requests recorded since the last flush to the exported children."""
        for recorder in self._recorders.values():
            recorder.flush()
        self.in_flight.set(self.requests_in_flight)
        self.client_connections.set(self.open_client_connections)

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
        timings, tally = metrics.timings, metrics.tally
        self.request_duration = {
            r: timings(metrics.request_duration.labels(r)) for r in [*routes, NO_ROUTE]
        }
        self.upstream_duration = {r: timings(metrics.upstream_duration.labels(r)) for r in routes}
        self.key_uses = {
            (project, kid): tally(metrics.key_uses.labels(project, kid))
            for project, kids in keys.items()
            for kid in kids
        }
        self.session_limited = {p: tally(metrics.session_limited.labels(p)) for p in projects}
        self.counter_duration = timings(metrics.counter_duration.labels(backend))
        self._requests: dict[tuple[str, str, int], Tally] = {}
        self._decisions: dict[tuple[str, str, str, str], Tally] = {
            (project, mode, decision, ""): tally(
                metrics.auth_decisions.labels(project, mode, decision, "")
            )
            for project, mode in projects.items()
            for decision in ("verified", "anonymous", "disabled")
        }
        for project, kids in keys.items():
            metrics.keys_loaded.labels(project).set(len(kids))

    def request(self, route: str, project: str, status: int) -> Tally:
        key = (route, project, status)
        recorder = self._requests.get(key)
        if recorder is None:
            child = self.metrics.requests.labels(route, project, str(status))
            recorder = self._requests[key] = self.metrics.tally(child)
        return recorder

    def decision(self, project: str, mode: str, decision: str, code: str) -> Tally:
        key = (project, mode, decision, code)
        recorder = self._decisions.get(key)
        if recorder is None:
            child = self.metrics.auth_decisions.labels(*key)
            recorder = self._decisions[key] = self.metrics.tally(child)
        return recorder
