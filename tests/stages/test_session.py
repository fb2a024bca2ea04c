"""Sessions: `session_of` keys a token failure by the request's session id, else its user,
else its client address; `count_failure` counts it and gives a `Retry-After` only once the
session is past the threshold; `client_of` reads the client's address through trusted
proxies only."""

from __future__ import annotations

import pytest

from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig
from gateway.counters import Session
from gateway.counters.memory import MemoryFailureCounter
from gateway.stages.authenticate import Attempt
from gateway.stages.session import client_of, count_failure, session_of
from gateway.telemetry.metrics import Metrics, Timings
from tests.stages.support import EVENTS, PEER, make_request, sample

ALICE = ("app", "app", "user", "alice")


@pytest.fixture
def counter(config: CompiledConfig, clock: ManualClock) -> MemoryFailureCounter:
    settings = config.settings.failure_counter
    return MemoryFailureCounter(
        ttl_seconds=settings.session_ttl_seconds, max_sessions=settings.max_sessions, clock=clock
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def timings(metrics: Metrics) -> Timings:
    return metrics.timings(metrics.counter_duration.labels("memory"))


# --- session_of --------------------------------------------------------------------------------


def test_a_session_id_comes_first(config: CompiledConfig) -> None:
    attempt = Attempt(identity="alice", session_id="s-1")
    assert session_of(config.project("app"), "app", attempt, PEER) == (
        "app",
        "app",
        "session",
        "s-1",
    )


def test_without_a_session_id_the_user_is_the_session(config: CompiledConfig) -> None:
    attempt = Attempt(identity="alice")
    assert session_of(config.project("app"), "app", attempt, PEER) == ALICE


def test_a_user_named_by_several_ids_is_one_session_whatever_their_order(
    config: CompiledConfig,
) -> None:
    one = Attempt(identity={"registered": "alice", "email": "a@example.com"})
    other = Attempt(identity={"email": "a@example.com", "registered": "alice"})
    project = config.project("app")
    assert session_of(project, "app", one, PEER) == session_of(project, "app", other, PEER)


def test_an_anonymous_request_is_its_clients_session(config: CompiledConfig) -> None:
    assert session_of(config.project("app"), "app", Attempt(), PEER) == (
        "app",
        "app",
        "client",
        PEER,
    )


def test_the_project_id_is_folded_so_its_spellings_share_a_session(
    config: CompiledConfig,
) -> None:
    """`App` and `app` name one project (ids never differ only by case)."""
    project = config.project("App")
    attempt = Attempt(identity="alice")
    assert session_of(project, "App", attempt, PEER) == session_of(project, "app", attempt, PEER)


def test_unlisted_projects_share_a_label_but_not_sessions(config: CompiledConfig) -> None:
    other = config.project("one")
    attempt = Attempt(identity="alice")
    first = session_of(other, "one", attempt, PEER)
    second = session_of(other, "two", attempt, PEER)
    assert first[0] == second[0] == "_other"
    assert first != second


# --- count_failure -----------------------------------------------------------------------------


async def test_failures_up_to_the_threshold_limit_nobody(
    config: CompiledConfig, counter: MemoryFailureCounter, timings: Timings
) -> None:
    threshold = config.settings.failure_counter.threshold
    assert threshold == 2
    assert await count_failure(counter, ALICE, threshold, timings) is None
    assert await count_failure(counter, ALICE, threshold, timings) is None


async def test_the_failure_past_the_threshold_gives_the_windows_retry_after(
    config: CompiledConfig, counter: MemoryFailureCounter, timings: Timings, clock: ManualClock
) -> None:
    """The window is fixed at the session's first failure: `Retry-After` is what is left."""
    threshold = config.settings.failure_counter.threshold
    await count_failure(counter, ALICE, threshold, timings)
    await count_failure(counter, ALICE, threshold, timings)
    clock.advance(100)
    assert await count_failure(counter, ALICE, threshold, timings) == 600 - 100
    assert await count_failure(counter, ALICE, threshold, timings) == 600 - 100


async def test_each_session_is_counted_on_its_own(
    counter: MemoryFailureCounter, timings: Timings
) -> None:
    bob: Session = ("app", "app", "user", "bob")
    for _ in range(3):
        await count_failure(counter, ALICE, 2, timings)
    assert await count_failure(counter, bob, 2, timings) is None


async def test_a_session_starts_afresh_once_its_window_has_ended(
    counter: MemoryFailureCounter, timings: Timings, clock: ManualClock
) -> None:
    for _ in range(3):
        await count_failure(counter, ALICE, 2, timings)
    clock.advance(600)
    assert await count_failure(counter, ALICE, 2, timings) is None


async def test_every_count_is_timed(
    counter: MemoryFailureCounter, metrics: Metrics, timings: Timings
) -> None:
    for _ in range(3):
        await count_failure(counter, ALICE, 2, timings)
    count = sample(metrics, "gateway_failure_counter_duration_seconds_count", {"backend": "memory"})
    assert count == 3


# --- client_of ---------------------------------------------------------------------------------


def test_without_trusted_proxies_the_client_is_the_peer(config: CompiledConfig) -> None:
    request = make_request("POST", EVENTS, [("X-Forwarded-For", "192.0.2.1")])
    assert client_of(request, ()) == PEER


def test_a_trusted_proxys_forwarded_for_names_the_client(config: CompiledConfig) -> None:
    request = make_request(
        "POST", EVENTS, [("X-Forwarded-For", "192.0.2.1, 10.0.0.9")], remote="10.1.2.3"
    )
    assert client_of(request, config.trusted_proxies) == "192.0.2.1"


def test_the_rightmost_untrusted_hop_is_the_client(config: CompiledConfig) -> None:
    """Hops left of it were written by the client itself and prove nothing."""
    request = make_request(
        "POST",
        EVENTS,
        [("X-Forwarded-For", "203.0.113.66, 192.0.2.1"), ("X-Forwarded-For", "10.0.0.9")],
        remote="10.1.2.3",
    )
    assert client_of(request, config.trusted_proxies) == "192.0.2.1"


def test_an_untrusted_peers_forwarded_for_is_ignored(config: CompiledConfig) -> None:
    request = make_request("POST", EVENTS, [("X-Forwarded-For", "192.0.2.1")])
    assert client_of(request, config.trusted_proxies) == PEER
