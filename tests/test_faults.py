"""Faults under load, with accounting: nothing the gateway accepted is lost or invented.

Every request carries a unique id (`X-Request-Id`, kept and forwarded by the gateway, and
`event_id` in the JSON body). The upstream here is a small HTTP/1.1 server on a raw asyncio socket
that records every request it received and every one it ACCEPTED (answered 2xx, completely), and
that misbehaves on command: stopped (connections refused), resetting mid-answer, hanging,
flapping, closing its keep-alive connections, answering errors of its own, answering slowly while
clients give up. Redis is a real `redis-server` stopped, SIGSTOPped and flapped; the real
`gateway run` process is reloaded and has its workers SIGKILLed; all under a bounded, paced,
concurrent load (8 clients) of anonymous, valid-token and refused requests.

For each fault the accounting must hold ("nothing accepted is lost"):

(a) every request the client saw as 2xx reached the upstream exactly once and was accepted there,
    and the body relayed is the upstream's answer for that very request;
(b) every request the upstream accepted was answered 2xx, unless the client's connection failed
    ("client gone": counted and reported);
(c) nothing else was answered 2xx: refused requests never reach the upstream;
(d) every other answer is the contract's JSON (401/429 for auth, 502/503/504 for the upstream or
    shutdown), with the request's own id, never a 500.

The figures of every fault are recorded as the `accounting` property of its test (junit XML) and
printed in a "fault accounting" section of the terminal summary, with or without `-s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import aiohttp
import jwt
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    GatewayFactory,
    KeyPair,
    RunningGateway,
    Tokens,
    base_config,
    children_of,
    eventually,
    free_port,
    gateway_process,
    write_config,
)
from tests.redis_support import RedisProcess

EVENTS = "/track/v2/projects/app/customers/events"
CONCURRENCY = 8
THRESHOLD = 3  # session failure limit: refused requests turn into 429s quickly

# --- requests ----------------------------------------------------------------------------------

PASS_KINDS = frozenset({"anonymous", "valid"})
# Each refused kind and the code it must be refused with (itself, or as the `cause` of a 429).
REFUSED_KINDS = {
    "expired": "TOKEN_EXPIRED",
    "bad_signature": "TOKEN_REJECTED",
    "wrong_user": "TOKEN_REJECTED",
    "no_token": "TOKEN_NOT_PROVIDED",
}
CYCLE = (
    "anonymous",
    "valid",
    "valid",
    "expired",
    "anonymous",
    "valid",
    "bad_signature",
    "valid",
    "anonymous",
    "wrong_user",
    "valid",
    "no_token",
)
USERS = [f"user-{i}" for i in range(8)]


@dataclass(frozen=True, slots=True)
class Planned:
    rid: str
    kind: str
    user: str | None
    headers: dict[str, str]
    body: bytes
    client_timeout: float | None = None  # the client gives up (goes away) after this

    @property
    def passes(self) -> bool:
        return self.kind in PASS_KINDS


def make_plan(fault: str, count: int, tokens: Tokens, other_key: KeyPair) -> list[Planned]:
    """`count` requests cycling through every kind, each with its own id."""

    def mint(claims: dict[str, Any], key: KeyPair) -> str:
        # Signed with the key object: `Tokens.mint` reloads the PEM (slow) for every token.
        return jwt.encode(claims, key.private, algorithm="RS256", headers=header)

    header = {"kid": tokens.kid, "typ": "JWT"}
    good = {u: mint(tokens.claims(u), tokens.key) for u in USERS}
    expired = {u: mint(tokens.claims(u, ttl=-120), tokens.key) for u in USERS}
    forged = {u: mint(tokens.claims(u), other_key) for u in USERS}  # kid key-a, wrong key
    plan = []
    for n in range(count):
        rid = f"{fault}-{n:05d}"
        kind = CYCLE[n % len(CYCLE)]
        user = USERS[n % len(USERS)]
        headers = {"Content-Type": "application/json", "X-Request-Id": rid}
        ids: dict[str, str] = {"registered": user}
        if kind == "anonymous":
            ids = {"cookie": f"c-{n}"}
        elif kind == "valid":
            headers |= {"X-Sdk-Auth-Token": good[user], "X-Session-Id": f"ok-{user}"}
        else:
            headers["X-Session-Id"] = f"bad-{n % 5}"
            if kind == "expired":
                headers["X-Sdk-Auth-Token"] = expired[user]
            elif kind == "bad_signature":
                headers["X-Sdk-Auth-Token"] = forged[user]
            elif kind == "wrong_user":
                headers["X-Sdk-Auth-Token"] = good[USERS[(n + 1) % len(USERS)]]
        body = json.dumps({"event_id": rid, "customer_ids": ids, "type": "page_visit"}).encode()
        plan.append(Planned(rid, kind, None if kind == "anonymous" else user, headers, body))
    return plan


# --- the misbehaving upstream ------------------------------------------------------------------

Action = Literal[
    "answer",  # 200, keep-alive
    "answer_close",  # 200 with `Connection: close`, then close
    "answer_fin",  # 200 without saying so, then close (FIN)
    "answer_error",  # 503 of its own (not accepted), keep-alive: relayed unchanged
    "answer_slow",  # 200 after SLOW_SECONDS
    "reset_before_answer",  # RST once the request is read
    "reset_mid_answer",  # RST after part of a 200
    "hang",  # never answers
]
SLOW_SECONDS = 0.3
ANSWERS: dict[Action, bytes] = {
    "answer": b"",
    "answer_slow": b"",
    "answer_close": b"Connection: close\r\n",
    "answer_fin": b"",
}


@dataclass(eq=False)
class _Connection:
    writer: asyncio.StreamWriter
    idle: bool = True
    closing: bool = False  # we are closing it: whatever it reads next is not received


class FaultyUpstream:
    """An HTTP/1.1 tracking API that records what it received and accepted, and misbehaves.

    `decide(seq, rid)` picks what to do with the `seq`-th request received. `stop()` closes the
    listener (new connections are refused) and every idle connection; a connection busy with a
    request finishes its answer first, so an answer is never cut by a stop. `start()` listens on
    the same port again."""

    def __init__(self) -> None:
        self.port = 0
        self.up = False
        self.decide: Callable[[int, str], Action] = lambda seq, rid: "answer"
        self.received: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.auth_status: dict[str, tuple[str | None, str | None]] = {}
        self.mismatched: list[str] = []  # header id and body id disagree
        self.actions: dict[Action, set[str]] = {
            action: set() for action in get_args(Action) if action != "answer"
        }
        self._seq = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        if self.up:
            return
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.up = True

    def stop(self) -> None:
        if not self.up or self._server is None:
            return
        self.up = False
        self._server.close()  # the listening socket closes now: connections are refused
        for connection in list(self._connections):
            if connection.idle:
                connection.closing = True
                connection.writer.close()

    async def quiet(self, seconds: float = 5) -> None:
        """Wait until no request is being answered (a slow answer still on its way)."""

        async def idle() -> bool:
            return all(c.idle for c in self._connections)

        await eventually(idle, "the upstream to finish answering", seconds, interval=0.01)

    async def close(self) -> None:
        self.stop()
        for connection in list(self._connections):
            connection.closing = True
            connection.writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        connection = _Connection(writer)
        self._connections.add(connection)
        try:
            while self.up and not connection.closing:
                connection.idle = True
                request = await _read_request(reader)
                connection.idle = False
                if request is None or connection.closing:
                    break  # the peer closed, or we closed it while the request arrived
                if not await self._answer(connection, reader, *request):
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._connections.discard(connection)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _answer(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        headers: dict[str, str],
        body: bytes,
    ) -> bool:
        """Handle one received request; False when the connection must end."""
        rid = headers.get("x-request-id", "")
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(body).get("event_id") != rid:
                self.mismatched.append(rid)
        self.received[rid] += 1
        self.auth_status[rid] = (
            headers.get("x-auth-status"),
            headers.get("x-authenticated-user"),
        )
        seq, self._seq = self._seq, self._seq + 1
        action = self.decide(seq, rid)
        writer = connection.writer
        if action != "answer":
            self.actions[action].add(rid)
        if action == "answer_slow":
            await asyncio.sleep(SLOW_SECONDS)  # a slow tracking API, not synchronisation
        if action in ANSWERS:
            payload = json.dumps({"accepted": rid}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%s"
                b"Content-Length: %d\r\nX-Upstream: faulty\r\n\r\n%s"
                % (ANSWERS[action], len(payload), payload)
            )
            await writer.drain()
            self.accepted[rid] += 1  # answered 2xx, completely
            return action in ("answer", "answer_slow")
        if action == "answer_error":
            payload = json.dumps({"upstream_error": rid}).encode()
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nX-Upstream: faulty\r\n\r\n%s" % (len(payload), payload)
            )
            await writer.drain()
            return True
        if action == "hang":
            # Never answer: wait for the gateway to give up and close (or for teardown).
            with contextlib.suppress(OSError):
                await reader.read()
            return False
        if action == "reset_mid_answer":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 200\r\n\r\n{"accepted": "'
            )
            await writer.drain()
        _reset(writer)
        return False


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return headers, bytes(body)
    return headers, await reader.readexactly(int(headers.get("content-length", "0")))


@pytest.fixture
async def faulty() -> AsyncIterator[FaultyUpstream]:
    upstream = FaultyUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


# --- the load ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    request: Planned
    status: int | None  # None: the client's connection failed (the client is "gone")
    error: str | None
    latency: float
    code: str | None = None
    cause: str | None = None
    problems: list[str] = field(default_factory=list)


# What each status may carry when the gateway answers itself.
GATEWAY_CODES = {
    401: {"TOKEN_NOT_PROVIDED", "TOKEN_EXPIRED", "TOKEN_REJECTED"},
    429: {"AUTH_FAILURE_LIMIT"},
    502: {"UPSTREAM_UNAVAILABLE"},
    503: {"SHUTTING_DOWN", "KEYS_UNAVAILABLE"},
    504: {"UPSTREAM_TIMEOUT"},
}
RETRY_AFTER_CODES = {"AUTH_FAILURE_LIMIT", "UPSTREAM_UNAVAILABLE", "KEYS_UNAVAILABLE"}


def check_answer(
    planned: Planned, status: int, headers: Any, body: bytes, outcome: Outcome
) -> None:
    """Fill in the outcome's code and every way the answer breaks the contract."""
    problems = outcome.problems
    if headers.get("X-Request-Id") != planned.rid:
        problems.append(f"X-Request-Id {headers.get('X-Request-Id')!r}")
    if 200 <= status < 300:
        if body != json.dumps({"accepted": planned.rid}).encode():
            problems.append(f"2xx body is not the upstream's answer to it: {body[:120]!r}")
        return
    if headers.get("X-Upstream") == "faulty":  # the upstream's own error, relayed
        outcome.code = "RELAYED"
        if body != json.dumps({"upstream_error": planned.rid}).encode():
            problems.append(f"relayed {status} body is not the upstream's: {body[:120]!r}")
        return
    if status not in GATEWAY_CODES:
        problems.append(f"status {status} is not one the gateway may answer here")
    if not headers.get("Content-Type", "").startswith("application/json"):
        problems.append(f"{status} Content-Type {headers.get('Content-Type')!r}")
    try:
        document = json.loads(body)
    except ValueError:
        problems.append(f"{status} body is not JSON: {body[:120]!r}")
        return
    if not isinstance(document, dict) or not isinstance(document.get("error"), dict):
        problems.append(f"{status} body is not the contract's error: {body[:120]!r}")
        return
    error = document["error"]
    outcome.code, outcome.cause = error.get("code"), error.get("cause")
    if next(iter(document)) != "token_expired" or not isinstance(document["token_expired"], bool):
        problems.append(f"{status} body does not lead with token_expired")
    underlying = outcome.cause or outcome.code
    if document["token_expired"] != (underlying == "TOKEN_EXPIRED"):
        problems.append(f"token_expired {document['token_expired']} for {underlying}")
    if error.get("request_id") != planned.rid:
        problems.append(f"request_id {error.get('request_id')!r}")
    if not all(isinstance(error.get(k), str) for k in ("code", "reason", "message")):
        problems.append(f"{status} error lacks code, reason or message")
    if outcome.code not in GATEWAY_CODES.get(status, set()):
        problems.append(f"{status} with code {outcome.code}")
    if outcome.code in RETRY_AFTER_CODES and not headers.get("Retry-After", "").isdigit():
        problems.append(f"{outcome.code} without a whole-second Retry-After")
    if status == 429 and outcome.cause is None:
        problems.append("429 without cause")
    if status in (401, 429) and underlying != REFUSED_KINDS.get(planned.kind, underlying):
        problems.append(f"{planned.kind} refused as {underlying}")


class Load:
    """`plan`, sent by `concurrency` clients, paced at `rate` requests a second; it ends by
    itself when the plan is sent. `reached(n)` returns once n requests have been answered."""

    def __init__(
        self,
        url: str,
        plan: Sequence[Planned],
        *,
        concurrency: int = CONCURRENCY,
        rate: float = 120,
        force_close: bool = False,
    ) -> None:
        self.url = url
        self.plan = plan
        self.concurrency = concurrency
        self.rate = rate
        self.force_close = force_close
        self.done = 0
        self.finished = False
        self._next = 0
        self._changed = asyncio.Condition()

    async def reached(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= count or self.finished)

    async def run(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=self.force_close)
        timeout = aiohttp.ClientTimeout(total=10)
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

                async def client() -> None:
                    while self._next < len(self.plan):
                        index, self._next = self._next, self._next + 1
                        due = started + index / self.rate
                        if due > time.monotonic():
                            await asyncio.sleep(due - time.monotonic())  # pacing the load
                        outcomes.append(await self._send(session, self.plan[index]))
                        async with self._changed:
                            self.done += 1
                            self._changed.notify_all()

                await asyncio.gather(*(client() for _ in range(self.concurrency)))
        finally:
            async with self._changed:
                self.finished = True
                self._changed.notify_all()
        return outcomes

    async def _send(self, session: aiohttp.ClientSession, planned: Planned) -> Outcome:
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=planned.client_timeout or 10)
        try:
            async with session.post(
                self.url + EVENTS, data=planned.body, headers=planned.headers, timeout=timeout
            ) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Outcome(planned, None, type(exc).__name__, time.monotonic() - started)
        outcome = Outcome(planned, response.status, None, time.monotonic() - started)
        check_answer(planned, response.status, response.headers, body, outcome)
        return outcome


async def run_with_faults(
    upstream: FaultyUpstream,
    load: Load,
    *faults: Callable[[Load], Coroutine[Any, Any, None]],
    seconds: float = 20,
) -> list[Outcome]:
    """The load and the faults together (the faults pace themselves on the load's progress),
    then until the upstream has finished every answer it started."""
    async with asyncio.timeout(seconds), asyncio.TaskGroup() as group:
        running = group.create_task(load.run())
        for fault in faults:
            group.create_task(fault(load))
    await upstream.quiet()
    return running.result()


# --- accounting --------------------------------------------------------------------------------


@dataclass
class Expect:
    """What the fault may do to each kind of request."""

    passing: frozenset[int | None]  # statuses allowed for anonymous and valid requests
    refused: frozenset[int | None] = frozenset({401, 429})
    # The rids the upstream broke or hung on, and the only status each may get.
    broken: dict[str, int] = field(default_factory=dict)


@dataclass
class Accounting:
    fault: str
    sent: int = 0
    answered_2xx: int = 0
    upstream_received: int = 0
    upstream_accepted: int = 0
    client_gone: int = 0
    gone_after_accept: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    max_latency: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "fault": self.fault,
            "sent": self.sent,
            "2xx": self.answered_2xx,
            "upstream_received": self.upstream_received,
            "upstream_accepted": self.upstream_accepted,
            "client_gone": self.client_gone,
            "client_gone_after_upstream_accept": self.gone_after_accept,
            "refusals": dict(sorted(self.refusals.items())),
            "max_latency_ms": round(self.max_latency * 1000),
            **self.notes,
            "violations": len(self.violations),
        }

    def line(self) -> str:
        refusals = ", ".join(f"{k}: {v}" for k, v in sorted(self.refusals.items())) or "none"
        notes = "".join(f" {k}={v}" for k, v in self.notes.items())
        return (
            f"{self.fault}: sent={self.sent} 2xx={self.answered_2xx} "
            f"upstream-received={self.upstream_received} "
            f"upstream-accepted={self.upstream_accepted} client-gone={self.client_gone} "
            f"(upstream-accepted {self.gone_after_accept}) refusals[{refusals}] "
            f"max-latency={self.max_latency * 1000:.0f}ms{notes} "
            f"violations={len(self.violations)}"
        )

    def describe(self) -> str:
        shown = self.violations[:40]
        more = len(self.violations) - len(shown)
        return "\n".join([self.line(), *shown, *([f"... and {more} more"] if more else [])])


def account(
    fault: str, outcomes: Sequence[Outcome], upstream: FaultyUpstream, expect: Expect
) -> Accounting:
    tally = Accounting(fault, sent=len(outcomes))
    violations = tally.violations
    by_id = {o.request.rid: o for o in outcomes}
    tally.upstream_received = sum(1 for rid in upstream.received if rid in by_id)
    tally.upstream_accepted = sum(1 for rid in upstream.accepted if rid in by_id)
    for outcome in outcomes:
        planned, status = outcome.request, outcome.status
        rid, kind = planned.rid, planned.kind
        received, accepted = upstream.received[rid], upstream.accepted[rid]
        tally.max_latency = max(tally.max_latency, outcome.latency)
        allowed = expect.passing if planned.passes else expect.refused
        if rid in expect.broken and status is not None:
            allowed = frozenset({expect.broken[rid]})
        if status not in allowed:
            got = status if status is not None else f"connection error {outcome.error}"
            violations.append(f"{rid} ({kind}): {got}, expected one of {sorted(allowed, key=str)}")
        violations.extend(f"{rid} ({kind}): {problem}" for problem in outcome.problems)
        if received > 1:
            violations.append(f"{rid} ({kind}): reached the upstream {received} times")
        if status is None:
            tally.client_gone += 1
            tally.gone_after_accept += accepted > 0
        elif 200 <= status < 300:
            tally.answered_2xx += 1
            if received != 1 or accepted != 1:  # (a)
                violations.append(
                    f"{rid} ({kind}): answered {status} but the upstream received it "
                    f"{received} times and accepted it {accepted} times"
                )
            if not planned.passes:  # (c)
                violations.append(f"{rid} ({kind}): a refused kind answered {status}")
        else:
            tally.refusals[f"{status} {outcome.code}"] += 1
            if accepted:  # (b)
                violations.append(f"{rid} ({kind}): the upstream accepted it, client got {status}")
        if not planned.passes and received:  # (c)
            violations.append(f"{rid} ({kind}): a refused request reached the upstream")
        if received and planned.passes:
            auth, user = upstream.auth_status[rid]
            wanted = ("verified", planned.user) if kind == "valid" else ("anonymous", None)
            if (auth, user) != wanted:
                violations.append(f"{rid} ({kind}): forwarded as {auth}/{user}, want {wanted}")
    violations.extend(
        f"{rid}: reached the upstream, never sent"
        for rid in upstream.received.keys() - by_id.keys()
    )
    violations.extend(f"{rid}: header and body ids differ" for rid in upstream.mismatched)
    return tally


class _AccountingSummary:
    """A plugin registered at run time: prints every fault's figures after the run."""

    name = "fault-accounting"

    def __init__(self) -> None:
        self.rows: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.rows:
            terminalreporter.section("fault accounting")
            for row in self.rows:
                terminalreporter.write_line(row)


Report = Callable[[Accounting], None]


@pytest.fixture
def report(
    request: pytest.FixtureRequest, record_property: Callable[[str, object], None]
) -> Report:
    manager = request.config.pluginmanager
    plugin = manager.get_plugin(_AccountingSummary.name)
    if not isinstance(plugin, _AccountingSummary):
        plugin = _AccountingSummary()
        manager.register(plugin, _AccountingSummary.name)

    def record(tally: Accounting) -> None:
        plugin.rows.append(tally.line())
        record_property("accounting", json.dumps(tally.summary()))

    return record


def settle(tally: Accounting, report: Report) -> Accounting:
    """Report the figures, then fail with all of them if any rule was broken."""
    report(tally)
    assert not tally.violations, tally.describe()
    return tally


# --- the upstream's faults, in front of the in-process gateway ---------------------------------


def upstream_settings(url: str, timeout: float = 5) -> dict[str, Any]:
    return {"url": url, "timeout_seconds": timeout, "connect_timeout_seconds": 1}


@pytest.fixture
async def faulty_gateway(make_gateway: GatewayFactory, faulty: FaultyUpstream) -> RunningGateway:
    return await make_gateway(
        upstream=upstream_settings(faulty.url, timeout=0.5),
        failure_counter={"threshold": THRESHOLD},
    )


async def test_upstream_stopped(
    faulty: FaultyUpstream,
    faulty_gateway: RunningGateway,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Up, then refusing connections for the middle of the load, then up again."""
    load = Load(faulty_gateway.url, make_plan("stopped", 360, tokens, key_b))

    async def stop_then_start(load: Load) -> None:
        await load.reached(100)
        faulty.stop()
        await load.reached(240)
        await faulty.start()

    outcomes = await run_with_faults(faulty, load, stop_then_start)
    tally = settle(
        account("upstream stopped", outcomes, faulty, Expect(frozenset({200, 502}))), report
    )
    assert tally.refusals["502 UPSTREAM_UNAVAILABLE"] >= 40, tally.line()
    assert tally.answered_2xx >= 100, tally.line()


async def test_upstream_resets_mid_answer(
    faulty: FaultyUpstream,
    faulty_gateway: RunningGateway,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Every fourth request gets an RST after a partial 200; every fourth another, an RST
    before any answer. Either is a 502, never the partial 200."""
    faulty.decide = lambda seq, rid: (
        "reset_mid_answer" if seq % 4 == 1 else "reset_before_answer" if seq % 4 == 3 else "answer"
    )
    outcomes = await run_with_faults(
        faulty, Load(faulty_gateway.url, make_plan("reset", 300, tokens, key_b))
    )
    broken = {rid: 502 for rid in faulty.actions["reset_mid_answer"]}
    broken |= {rid: 502 for rid in faulty.actions["reset_before_answer"]}
    expect = Expect(frozenset({200}), broken=broken)
    tally = account("upstream resets", outcomes, faulty, expect)
    tally.notes = {
        "reset_mid_answer": len(faulty.actions["reset_mid_answer"]),
        "reset_before_answer": len(faulty.actions["reset_before_answer"]),
    }
    settle(tally, report)
    assert tally.refusals["502 UPSTREAM_UNAVAILABLE"] == len(broken) >= 40, tally.line()


async def test_upstream_hangs(
    faulty: FaultyUpstream,
    faulty_gateway: RunningGateway,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Every sixth request is never answered: 504 after upstream.timeout_seconds (0.5 s)."""
    faulty.decide = lambda seq, rid: "hang" if seq % 6 == 5 else "answer"
    outcomes = await run_with_faults(
        faulty, Load(faulty_gateway.url, make_plan("hang", 240, tokens, key_b))
    )
    broken = dict.fromkeys(faulty.actions["hang"], 504)
    tally = account("upstream hangs", outcomes, faulty, Expect(frozenset({200}), broken=broken))
    tally.notes = {"hung": len(broken)}
    settle(tally, report)
    assert tally.refusals["504 UPSTREAM_TIMEOUT"] == len(broken) >= 15, tally.line()
    assert tally.max_latency < 3, tally.line()


async def test_upstream_closes_and_errors(
    faulty: FaultyUpstream,
    faulty_gateway: RunningGateway,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Keep-alive abuse and the upstream's own errors: a 200 then `Connection: close`, a 200
    then a bare close, a 503 of its own (relayed unchanged, never a 2xx), in turn with plain
    200s. A pooled connection the upstream closed must never cost a request (no 502)."""
    actions: tuple[Action, ...] = ("answer", "answer_close", "answer", "answer_fin")
    faulty.decide = lambda seq, rid: "answer_error" if seq % 5 == 4 else actions[seq % 4]
    outcomes = await run_with_faults(
        faulty, Load(faulty_gateway.url, make_plan("closes", 300, tokens, key_b))
    )
    broken = dict.fromkeys(faulty.actions["answer_error"], 503)
    tally = account("upstream closes", outcomes, faulty, Expect(frozenset({200}), broken=broken))
    tally.notes = {
        "answer_close": len(faulty.actions["answer_close"]),
        "answer_fin": len(faulty.actions["answer_fin"]),
        "upstream_503": len(broken),
    }
    settle(tally, report)
    assert tally.refusals["503 RELAYED"] == len(broken) >= 30, tally.line()


async def test_clients_go_away(
    faulty: FaultyUpstream,
    faulty_gateway: RunningGateway,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Every fifth request gives up after 0.1 s while the upstream takes 0.3 s to accept it:
    the one case (b) allows, an accepted request whose client never saw the 2xx. The gateway
    still forwards it exactly once and serves everyone else."""
    plan = make_plan("gone", 300, tokens, key_b)
    plan = [replace(p, client_timeout=0.1) if n % 5 == 0 else p for n, p in enumerate(plan)]
    leaving = {p.rid for p in plan if p.client_timeout is not None and p.passes}
    faulty.decide = lambda seq, rid: "answer_slow" if rid in leaving else "answer"
    outcomes = await run_with_faults(faulty, Load(faulty_gateway.url, plan))
    expect = Expect(frozenset({200, None}), refused=frozenset({401, 429}))
    tally = account("clients go away", outcomes, faulty, expect)
    tally.notes = {"clients_leaving": len(leaving)}
    settle(tally, report)
    gone = {o.request.rid for o in outcomes if o.status is None}
    assert gone == leaving, tally.line()
    assert tally.gone_after_accept == len(leaving) >= 30, tally.line()


async def test_upstream_flaps(
    faulty: FaultyUpstream,
    faulty_gateway: RunningGateway,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Down and up again every 30 answers, for the whole load."""
    load = Load(faulty_gateway.url, make_plan("flap", 400, tokens, key_b))
    flips = 0

    async def flap(load: Load) -> None:
        nonlocal flips
        mark = 30
        while not load.finished:
            await load.reached(mark)
            if faulty.up:
                faulty.stop()
            else:
                await faulty.start()
            flips += 1
            mark += 30
        await faulty.start()

    outcomes = await run_with_faults(faulty, load, flap)
    tally = account("upstream flapping", outcomes, faulty, Expect(frozenset({200, 502})))
    tally.notes = {"flips": flips}
    settle(tally, report)
    assert flips >= 10, tally.line()
    assert tally.refusals["502 UPSTREAM_UNAVAILABLE"] >= 30, tally.line()
    assert tally.answered_2xx >= 100, tally.line()


# --- Redis faults, with `failure_counter.backend: redis` ---------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_gateway(
    make_gateway: GatewayFactory, faulty: FaultyUpstream, redis_server: RedisProcess
) -> RunningGateway:
    return await make_gateway(
        upstream=upstream_settings(faulty.url),
        failure_counter={
            "backend": "redis",
            "redis_url": redis_server.url,
            "redis_timeout_ms": 50,
            "threshold": THRESHOLD,
        },
    )


async def metric_sum(admin_url: str, name: str, **labels: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(admin_url + "/metrics") as response,
    ):
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def counting_again(gateway: RunningGateway, session_id: str, tokens: Tokens) -> int:
    """Expired-token requests from one session until one is limited (429): the counter counts
    again. Returns how many it took (THRESHOLD + 1 when every failure was counted); fails past
    the deadline. The first call after Redis restarts may fail on a pooled connection to the old
    server and go uncounted, so callers allow one more."""
    headers = {
        "Content-Type": "application/json",
        "X-Session-Id": session_id,
        "X-Sdk-Auth-Token": tokens.expired("user-0"),
    }
    body = json.dumps({"customer_ids": {"registered": "user-0"}})
    sent = 0
    async with aiohttp.ClientSession() as session:

        async def limited() -> int:
            nonlocal sent
            async with session.post(gateway.url + EVENTS, data=body, headers=headers) as r:
                sent += 1
                assert r.status in (401, 429)
                return sent if r.status == 429 else 0

        def what() -> str:
            return f"the counter to count again ({sent} sent)"

        return await eventually(limited, what, 5, ignoring=())


async def test_redis_down(
    faulty: FaultyUpstream,
    redis_gateway: RunningGateway,
    redis_server: RedisProcess,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Stopped for the whole load: nothing is counted (401, never 429), everything else is
    decided as usual; once back, the counter counts again."""
    await asyncio.to_thread(redis_server.stop)
    outcomes = await run_with_faults(
        faulty, Load(redis_gateway.url, make_plan("redis-down", 300, tokens, key_b))
    )
    tally = account(
        "redis down", outcomes, faulty, Expect(frozenset({200}), refused=frozenset({401}))
    )
    errors = await metric_sum(
        redis_gateway.admin_url, "gateway_failure_counter_errors_total", backend="redis"
    )
    await asyncio.to_thread(redis_server.start)
    took = await counting_again(redis_gateway, "after-down", tokens)
    tally.notes = {"counter_errors": int(errors), "429_after_recovery_at": took}
    settle(tally, report)
    assert errors >= 90, tally.line()
    assert took <= THRESHOLD + 2, tally.line()


async def test_redis_hung(
    faulty: FaultyUpstream,
    redis_gateway: RunningGateway,
    redis_server: RedisProcess,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """SIGSTOPped for the whole load: every counter call is cut at redis_timeout_ms (50 ms)."""
    redis_server.pause()
    try:
        outcomes = await run_with_faults(
            faulty, Load(redis_gateway.url, make_plan("redis-hung", 300, tokens, key_b))
        )
    finally:
        redis_server.resume()
    tally = account(
        "redis hung", outcomes, faulty, Expect(frozenset({200}), refused=frozenset({401}))
    )
    errors = await metric_sum(
        redis_gateway.admin_url, "gateway_failure_counter_errors_total", backend="redis"
    )
    # A command written while it slept may still apply: that only brings the 429 sooner.
    took = await counting_again(redis_gateway, "after-hang", tokens)
    tally.notes = {"counter_errors": int(errors), "429_after_recovery_at": took}
    settle(tally, report)
    assert errors >= 90, tally.line()
    assert tally.max_latency < 1.5, tally.line()
    assert took <= THRESHOLD + 2, tally.line()


async def test_redis_flaps(
    faulty: FaultyUpstream,
    redis_gateway: RunningGateway,
    redis_server: RedisProcess,
    tokens: Tokens,
    key_b: KeyPair,
    report: Report,
) -> None:
    """Stopped, started, paused, resumed, over and over, every 30 answers."""
    load = Load(redis_gateway.url, make_plan("redis-flap", 360, tokens, key_b))
    steps: list[str] = []

    async def flap(load: Load) -> None:
        cycle = ("stop", "start", "pause", "resume")
        mark = 30
        while not load.finished:
            await load.reached(mark)
            step = cycle[len(steps) % len(cycle)]
            if step == "stop":
                await asyncio.to_thread(redis_server.stop)
            elif step == "start":
                await asyncio.to_thread(redis_server.start)
            elif step == "pause":
                redis_server.pause()
            else:
                redis_server.resume()
            steps.append(step)
            mark += 30
        if steps and steps[-1] == "stop":
            await asyncio.to_thread(redis_server.start)
        redis_server.resume()

    outcomes = await run_with_faults(faulty, load, flap)
    tally = account("redis flapping", outcomes, faulty, Expect(frozenset({200})))
    took = await counting_again(redis_gateway, "after-flap", tokens)
    tally.notes = {"transitions": len(steps), "429_after_recovery_at": took}
    settle(tally, report)
    assert len(steps) >= 8, tally.line()
    assert took <= THRESHOLD + 2, tally.line()


# --- the real process: reloads and killed workers ----------------------------------------------


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    url: str
    admin: str
    config_path: Path
    config: dict[str, Any]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


TRANSIENT = (aiohttp.ClientError, OSError)  # a worker or listener not there yet


async def ready(admin: str) -> bool:
    async with aiohttp.ClientSession() as session, session.get(admin + "/readyz") as response:
        return response.status == 200


@contextlib.asynccontextmanager
async def started_gateway(
    tmp_path: Path, upstream_url: str, key_a: KeyPair, key_b: KeyPair, **overrides: Any
) -> AsyncIterator[GatewayProcess]:
    """`gateway run` as a real process; killed, with its workers, however the test ends."""
    config = base_config(upstream_url)
    config.update(
        listen=f"127.0.0.1:{free_port()}",
        admin_listen=f"127.0.0.1:{free_port()}",
        shutdown={"drain_delay_seconds": 0, "grace_seconds": 5},
        failure_counter={"threshold": THRESHOLD},
        **overrides,
    )
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    log = tmp_path / "gateway.stderr"
    async with gateway_process(path, config["admin_listen"], stderr=log) as process:
        yield GatewayProcess(
            process,
            f"http://{config['listen']}",
            f"http://{config['admin_listen']}",
            path,
            config,
            log,
        )


async def test_reloads_under_load(
    tmp_path: Path,
    faulty: FaultyUpstream,
    tokens: Tokens,
    key_a: KeyPair,
    key_b: KeyPair,
    report: Report,
) -> None:
    """SIGHUP and POST /-/reload in turn, every 40 answers; each reload changes the upstream
    settings (a new connection pool, the old one closed under load) and the counter."""
    tokens.clock.set(time.time())
    async with started_gateway(
        tmp_path, faulty.url, key_a, key_b, upstream=upstream_settings(faulty.url, timeout=1)
    ) as gateway:
        load = Load(gateway.url, make_plan("reload", 480, tokens, key_b))
        reloads: list[str] = []

        async def reload(load: Load) -> None:
            async with aiohttp.ClientSession() as session:
                while len(reloads) < 10 and not load.finished:
                    await load.reached(40 * (len(reloads) + 1))
                    config = yaml.safe_load(gateway.config_path.read_text())
                    config["projects"]["app"]["expiry_warning_seconds"] = 100 + len(reloads)
                    config["upstream"]["timeout_seconds"] = 1 + len(reloads) % 2 / 2
                    config["failure_counter"]["session_ttl_seconds"] = 1800 + len(reloads)
                    gateway.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
                    if len(reloads) % 2:
                        gateway.process.send_signal(signal.SIGHUP)
                        reloads.append("SIGHUP")
                    else:
                        async with session.post(gateway.admin + "/-/reload") as response:
                            assert response.status == 200, await response.text()
                        reloads.append("POST")

        outcomes = await run_with_faults(faulty, load, reload)

        async def all_applied() -> bool:
            applied = await metric_sum(
                gateway.admin, "gateway_config_reloads_total", result="success"
            )
            return applied == len(reloads)

        await eventually(all_applied, "every reload to be applied", 15, ignoring=TRANSIENT)
        tally = account("reloads", outcomes, faulty, Expect(frozenset({200})))
        tally.notes = {"reloads": len(reloads)}
        settle(tally, report)
        assert len(reloads) == 10, tally.line()
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await gateway.process.wait() == 0, gateway.log_tail()


async def test_worker_killed_under_load(
    tmp_path: Path,
    faulty: FaultyUpstream,
    tokens: Tokens,
    key_a: KeyPair,
    key_b: KeyPair,
    report: Report,
) -> None:
    """`workers: 2`; SIGKILL one worker, wait for its replacement to serve, SIGKILL the other.
    A request on a killed worker may end in a connection error (the client sees the server go
    away: counted as "client gone"), never in a wrong answer or a lost 2xx."""
    tokens.clock.set(time.time())
    async with started_gateway(tmp_path, faulty.url, key_a, key_b, workers=2) as gateway:
        parent = gateway.process.pid
        original = children_of(parent)
        assert len(original) == 2
        # A connection per request, so the kernel spreads them over both workers.
        load = Load(gateway.url, make_plan("kill", 600, tokens, key_b), force_close=True)
        killed: list[int] = []

        async def kill_each(load: Load) -> None:
            for victim in sorted(original):
                await load.reached(80 if not killed else load.done + 40)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

                async def replaced(victim: int = victim) -> bool:
                    now = children_of(parent)
                    return len(now) == 2 and victim not in now and await ready(gateway.admin)

                await eventually(
                    replaced,
                    "the killed worker to be replaced",
                    15,
                    interval=0.05,  # a scan of /proc each time, while the load runs
                    ignoring=TRANSIENT,
                )

        outcomes = await run_with_faults(faulty, load, kill_each, seconds=30)
        passing = frozenset({200, None})
        tally = account(
            "worker killed",
            outcomes,
            faulty,
            Expect(passing, refused=frozenset({401, 429, None})),
        )
        tally.notes = {"workers_killed": len(killed)}
        settle(tally, report)
        assert len(killed) == 2, tally.line()
        assert children_of(parent).isdisjoint(original)
        assert tally.answered_2xx >= 250, tally.line()
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await gateway.process.wait() == 0, gateway.log_tail()
