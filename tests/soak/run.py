"""`make soak`: the real `gateway run` under a steady, mixed, hostile load, watched from /proc.

    python -m tests.soak.run

For each counter backend it starts a tracking API (`tests/soak/upstream.py`), for `redis` a
`redis-server`, and one `gateway run` process (a single process: the one /proc is read for),
then sends SOAK_RPS requests a second for SOAK_SECONDS from asyncio clients on loopback:
valid tokens (SOAK_USERS users, every token reused), invalid tokens (bad signature, expired,
someone else's), anonymous requests, and hostile ones (malformed JSON, duplicate keys, a form
body, oversized bodies, bad paths, unknown routes, wrong methods, garbage bytes and truncated
bodies on raw sockets). The gateway's RSS (VmRSS) and open fds (/proc/PID/fd, its TCP sockets
sorted by peer) are sampled after the warm-up, every SOAK_SAMPLE_SECONDS, at the end of the
load and once its connections have closed; its /metrics is scraped at every sample.

Environment: SOAK_SECONDS (120; the load per backend, warm-up included), SOAK_RPS (300),
SOAK_CONCURRENCY (64 clients), SOAK_WARMUP_SECONDS (min(10, SOAK_SECONDS / 4)),
SOAK_SAMPLE_SECONDS (5), SOAK_USERS (1000), SOAK_BACKENDS (memory,redis; redis needs
redis-server on PATH and is left out, with a line saying so, when it is missing and not asked
for by name).

Criteria, for every backend; the exit status is 1 if any fails (2 if the soak could not run):

1. answers: no unexpected answer — no 5xx, no 2xx for a request that must be refused, no
   refusal of a valid or anonymous request (valid requests are never session-limited, so the
   only 429s expected are for invalid tokens), nothing outside the category's expected answers
   (see `traffic.CATEGORIES`), and every error the contract's JSON with the request's id;
2. memory flat: RSS at the end of the load <= RSS after the warm-up x 1.15 (the RSS trend
   after the warm-up, least squares in MiB/min, is reported beside it, not judged);
3. fds did not grow: once the load is over and its connections closed (10 s at most), the
   gateway holds no client connection, its fds other than connections (files, listeners, event
   loop, pipes) are no more than after the warm-up, and its pool to the tracking API holds no
   more connections than there were clients;
4. accounting: requests answered 2xx == requests the tracking API accepted (verified ones ==
   valid requests answered 2xx, anonymous ones == anonymous requests answered 2xx, nothing else)
   == the 2xx in the gateway's own gateway_requests_total;
5. the gateway exits 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from tests.soak.procs import (
    Fds,
    Services,
    SoakError,
    fds,
    free_port,
    http_ok,
    python_module,
    redis_pong,
    redis_server_binary,
    rss_kib,
    wait_until,
)
from tests.soak.traffic import CATEGORIES, Tally, TokenPools, Traffic
from tests.soak.upstream import STATS_PATH

RSS_GROWTH_LIMIT = 1.15  # end RSS <= post-warm-up RSS x this
QUIESCE_SECONDS = 10.0
MAX_BODY_BYTES = 65_536
KID = "soak-1"


@dataclass(frozen=True, slots=True)
class Settings:
    seconds: float
    rps: float
    concurrency: int
    warmup: float
    sample_every: float
    users: int
    backends: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def number(name: str, default: float) -> float:
            raw = env.get(name, "")
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise SoakError(f"{name}={raw!r} is not a number") from None
            if value <= 0:
                raise SoakError(f"{name} must be positive")
            return value

        if not Path("/proc/self/status").exists():
            raise SoakError("needs Linux /proc to watch the gateway process")
        seconds = number("SOAK_SECONDS", 120)
        warmup = number("SOAK_WARMUP_SECONDS", min(10, seconds / 4))
        if warmup >= seconds:
            raise SoakError("SOAK_WARMUP_SECONDS must be shorter than SOAK_SECONDS")
        notes: list[str] = []
        asked = env.get("SOAK_BACKENDS", "")
        backends = tuple(b.strip() for b in (asked or "memory,redis").split(",") if b.strip())
        if unknown := set(backends) - {"memory", "redis"}:
            raise SoakError(f"SOAK_BACKENDS: unknown backend(s) {sorted(unknown)}")
        if "redis" in backends and redis_server_binary() is None:
            if asked:
                raise SoakError("SOAK_BACKENDS asks for redis but redis-server is not on PATH")
            backends = tuple(b for b in backends if b != "redis")
            notes.append("redis backend left out: redis-server is not on PATH")
        return cls(
            seconds=seconds,
            rps=number("SOAK_RPS", 300),
            concurrency=int(number("SOAK_CONCURRENCY", 64)),
            warmup=warmup,
            sample_every=number("SOAK_SAMPLE_SECONDS", 5),
            users=int(number("SOAK_USERS", 1000)),
            backends=backends,
            notes=tuple(notes),
        )


@dataclass(frozen=True, slots=True)
class Keys:
    public_pem: str
    private_pem: bytes
    other_private_pem: bytes  # signs the forged tokens

    @classmethod
    def generate(cls) -> Keys:
        def private() -> rsa.RSAPrivateKey:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)

        def pem(key: rsa.RSAPrivateKey) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )

        key, other = private(), private()
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(public.decode(), pem(key), pem(other))


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # seconds since the load started
    rss_kib: int
    fds: Fds


@dataclass
class Criterion:
    name: str
    ok: bool
    detail: str


@dataclass
class Outcome:
    backend: str
    criteria: list[Criterion] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.criteria) and all(c.ok for c in self.criteria)


def gateway_config(
    directory: Path,
    backend: str,
    ports: Mapping[str, int],
    redis_port: int | None,
    public_pem: str,
) -> Path:
    (directory / "keys").mkdir()
    (directory / "keys" / "soak.pem").write_text(public_pem)
    counter: dict[str, object] = {"backend": backend, "threshold": 10}
    if redis_port is not None:
        counter |= {"redis_url": f"redis://127.0.0.1:{redis_port}/0", "redis_timeout_ms": 50}
    config = {
        "listen": f"127.0.0.1:{ports['public']}",
        "admin_listen": f"127.0.0.1:{ports['admin']}",
        "upstream": {"url": f"http://127.0.0.1:{ports['upstream']}", "timeout_seconds": 5},
        "limits": {"max_body_bytes": MAX_BODY_BYTES},
        "shutdown": {"drain_delay_seconds": 0, "grace_seconds": 5},
        "failure_counter": counter,
        "projects": {
            "app": {
                "mode": "required",
                "algorithms": ["RS256"],
                "keys": [{"id": KID, "pem_file": "keys/soak.pem"}],
            }
        },
        "identity": [{"json": "customer_ids.registered"}, {"header": "X-User-Id"}],
        "token": [
            {"header": "X-Sdk-Auth-Token"},
            {"header": "Authorization", "scheme": "Bearer"},
        ],
        "session": [{"header": "X-Session-Id"}],
        "routes": [
            {
                "name": "track-events",
                "methods": ["POST"],
                "path": "/track/v2/projects/{project}/customers/events",
                "auth": ["sdk_jwt"],
            }
        ],
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def fetch_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


def metric_totals(text: str) -> dict[str, Counter[str]]:
    """Each sample name's values summed by the label that matters for the report."""
    by = {
        "gateway_requests_total": "status",
        "gateway_auth_decisions_total": "decision",
        "gateway_upstream_errors_total": "kind",
        "gateway_session_limited_total": "project",
        "gateway_failure_counter_errors_total": "backend",
        "gateway_config_reloads_total": "result",
    }
    totals: dict[str, Counter[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in by:
                label = sample.labels.get(by[sample.name], "")
                totals.setdefault(sample.name, Counter())[label] += int(sample.value)
    return totals


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def describe_fds(found: Fds) -> str:
    return (
        f"{found.total} (clients {found.clients}, upstream {found.upstream}, redis "
        f"{found.redis}, listeners {found.listeners}, other sockets {found.other_sockets}, "
        f"non-connection {found.fixed})"
    )


def say(line: str = "") -> None:
    print(line, flush=True)


class GatewayDied(Exception):
    """The gateway process went away during the soak: a failure, not a setup problem."""


async def soak_backend(backend: str, settings: Settings, keys: Keys, pools: TokenPools) -> Outcome:
    with tempfile.TemporaryDirectory(prefix=f"gateway-soak-{backend}-") as temporary:
        services = Services(Path(temporary))
        try:
            return await _soak(backend, settings, keys, pools, Path(temporary), services)
        except GatewayDied as exc:
            say(f"[FAIL] gateway alive: {exc}")
            return Outcome(backend, [Criterion("gateway alive", False, str(exc))])
        finally:
            await services.stop_all()


async def _soak(
    backend: str,
    settings: Settings,
    keys: Keys,
    pools: TokenPools,
    directory: Path,
    services: Services,
) -> Outcome:
    ports = {"public": free_port(), "admin": free_port(), "upstream": free_port()}
    admin = f"http://127.0.0.1:{ports['admin']}"
    upstream_stats = f"http://127.0.0.1:{ports['upstream']}{STATS_PATH}"
    say(f"== soak: {backend} counter backend ==")
    async with aiohttp.ClientSession() as http:
        upstream = await services.start(
            "upstream", python_module("tests.soak.upstream", "--port", str(ports["upstream"]))
        )
        await wait_until(lambda: http_ok(http, upstream_stats), "the tracking API", upstream)
        redis_port = None
        if backend == "redis":
            redis_port = free_port()
            binary = redis_server_binary()
            assert binary is not None
            argv = [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--dir", str(directory)]
            redis = await services.start("redis", argv)
            await wait_until(lambda: redis_pong(redis_port), "redis-server", redis)
        config = gateway_config(directory, backend, ports, redis_port, keys.public_pem)
        gateway = await services.start(
            "gateway", python_module("gateway", "run", "-c", str(config)), stdout_to_log=False
        )
        await wait_until(lambda: http_ok(http, admin + "/readyz"), "the gateway", gateway)

    def sample(at: float) -> Sample:
        try:
            found = fds(
                gateway.pid,
                serving={ports["public"], ports["admin"]},
                upstream=ports["upstream"],
                redis=redis_port,
            )
            return Sample(at, rss_kib(gateway.pid), found)
        except (OSError, SoakError):  # gone, or a zombie without VmRSS
            raise GatewayDied(
                f"the gateway exited during the load:\n{gateway.log_tail()}"
            ) from None

    idle = sample(0.0)
    say(
        f"gateway pid {gateway.pid}, idle before the load: RSS {mib(idle.rss_kib)}, fds "
        f"{describe_fds(idle.fds)}"
    )
    traffic = Traffic(
        "127.0.0.1",
        ports["public"],
        pools,
        rate=settings.rps,
        seconds=settings.seconds,
        concurrency=settings.concurrency,
        max_body_bytes=MAX_BODY_BYTES,
    )
    samples: list[Sample] = []
    ends: list[Sample] = []
    traffic.at_end = lambda: ends.append(sample(time.monotonic() - traffic.started))
    load = asyncio.ensure_future(traffic.run())
    try:
        await _sample_during(load, traffic, settings, sample, samples, admin)
        tally = await load
    finally:
        if not load.done():
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
    end = ends[0]
    after = await _quiesce(sample, (samples[0] if samples else end).fds.fixed)
    metrics = metric_totals(await fetch_text(admin + "/metrics"))
    accepted: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http, http.get(upstream_stats) as response:
        accepted.update(await response.json())
    exit_status = await gateway.stop()
    if exit_status != 0:
        say(gateway.log_tail())
    observed = Observed(
        tally, traffic.finished - traffic.started, idle, samples, end, after, metrics, accepted
    )
    outcome = Outcome(backend, judge(observed, settings, exit_status))
    for criterion in outcome.criteria:
        say(f"[{'PASS' if criterion.ok else 'FAIL'}] {criterion.name}: {criterion.detail}")
    say()
    return outcome


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything one backend's run measured."""

    tally: Tally
    elapsed: float
    idle: Sample  # before the load
    samples: list[Sample]  # the first is the post-warm-up baseline
    end: Sample  # as the last answer came in, clients still connected
    after: Sample  # once the clients' connections closed
    metrics: dict[str, Counter[str]]
    accepted: Counter[str]  # by the tracking API, by X-Auth-Status

    @property
    def baseline(self) -> Sample:
        return self.samples[0] if self.samples else self.end


def rss_trend(samples: list[Sample]) -> float:
    """MiB per minute, least squares over the samples after the warm-up (0 if too few)."""
    if len(samples) < 3:
        return 0.0
    xs, ys = [s.at for s in samples], [s.rss_kib / 1024 for s in samples]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return slope * 60


def judge(observed: Observed, settings: Settings, exit_status: int) -> list[Criterion]:
    """Print the report; the criteria (see the module docstring) with their figures."""
    tally, baseline, end, after = observed.tally, observed.baseline, observed.end, observed.after
    sent = sum(tally.sent.values())
    say(
        f"load: {sent} requests in {observed.elapsed:.1f} s = {sent / observed.elapsed:.0f}/s "
        f"(target {settings.rps:.0f}/s, {settings.concurrency} clients), max lag behind "
        f"schedule {tally.max_lag * 1000:.0f} ms"
    )
    if sent / observed.elapsed < 0.9 * settings.rps:
        say("WARNING: the load fell more than 10 % short of SOAK_RPS")
    say("requests sent by category, and their answers:")
    for category in CATEGORIES:
        answers = ", ".join(
            f"{label} x{count}" for label, count in tally.answers.get(category.name, {}).items()
        )
        say(f"  {category.name:<17} {tally.sent[category.name]:>7}   {answers}")
    by_status = tally.by_status()
    say("answers by status: " + ", ".join(f"{k} x{v}" for k, v in sorted(by_status.items())))
    ordered = sorted(tally.latencies)
    if ordered:

        def pct(q: float) -> str:
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"

        say(
            f"latency of forwarded requests (ms): p50 {pct(0.5)}, p99 {pct(0.99)}, "
            f"max {ordered[-1] * 1000:.1f}"
        )
    unexpected = sum(tally.unexpected.values())
    say(f"unexpected answers: {unexpected}")
    for kind, count in tally.unexpected.most_common():
        say(f"  {kind} x{count}")
    for example in tally.examples:
        say(f"  e.g. {example}")

    say("gateway process samples (t, RSS, fds):")
    say(f"  idle   RSS {mib(observed.idle.rss_kib):>10}  fds {describe_fds(observed.idle.fds)}")
    for s in observed.samples:
        say(f"  {s.at:5.0f}s RSS {mib(s.rss_kib):>10}  fds {describe_fds(s.fds)}")
    say(f"  end    RSS {mib(end.rss_kib):>10}  fds {describe_fds(end.fds)}")
    say(f"  after  RSS {mib(after.rss_kib):>10}  fds {describe_fds(after.fds)}")
    everything = [observed.idle, *observed.samples, end, after]
    say(
        f"RSS after warm-up {mib(baseline.rss_kib)}, at the end {mib(end.rss_kib)} "
        f"({(end.rss_kib / baseline.rss_kib - 1) * 100:+.1f} %), max "
        f"{mib(max(s.rss_kib for s in everything))}, trend after warm-up "
        f"{rss_trend(observed.samples):+.2f} MiB/min; fds after warm-up {baseline.fds.total}, "
        f"at the end {end.fds.total}, after the load {after.fds.total}, max "
        f"{max(s.fds.total for s in everything)}"
    )
    metrics = observed.metrics
    say(
        "metrics: "
        + "; ".join(f"{name} {dict(sorted(counts.items()))}" for name, counts in metrics.items())
    )

    accepted = observed.accepted
    answered_2xx = by_status["200"]
    valid_2xx = tally.answers.get("valid", Counter())["200"]
    anonymous_2xx = tally.answers.get("anonymous", Counter())["200"]
    metrics_2xx = sum(
        v for k, v in metrics.get("gateway_requests_total", {}).items() if k.startswith("2")
    )
    others = sum(v for k, v in accepted.items() if k not in ("verified", "anonymous"))
    say(
        f"accounting: answered 2xx {answered_2xx}; the tracking API accepted "
        f"{sum(accepted.values())} (verified {accepted['verified']}, anonymous "
        f"{accepted['anonymous']}, other {others}); gateway_requests_total 2xx {metrics_2xx}"
    )

    limit = int(baseline.rss_kib * RSS_GROWTH_LIMIT)
    return [
        Criterion("answers", unexpected == 0, f"{unexpected} unexpected answers of {sent}"),
        Criterion(
            "memory flat",
            end.rss_kib <= limit,
            f"end RSS {mib(end.rss_kib)} <= post-warm-up {mib(baseline.rss_kib)} x "
            f"{RSS_GROWTH_LIMIT} = {mib(limit)}",
        ),
        Criterion(
            "fds did not grow",
            after.fds.clients == 0
            and after.fds.fixed <= baseline.fds.fixed
            and after.fds.upstream <= settings.concurrency,
            f"after the load: {after.fds.clients} client connections (want 0), "
            f"{after.fds.fixed} non-connection fds (after warm-up {baseline.fds.fixed}), "
            f"{after.fds.upstream} upstream connections (<= {settings.concurrency})",
        ),
        Criterion(
            "accounting",
            answered_2xx == sum(accepted.values()) == metrics_2xx
            and accepted["verified"] == valid_2xx
            and accepted["anonymous"] == anonymous_2xx
            and others == 0,
            f"2xx {answered_2xx} = accepted {sum(accepted.values())} = metrics {metrics_2xx}; "
            f"verified {accepted['verified']} = valid 2xx {valid_2xx}; anonymous "
            f"{accepted['anonymous']} = anonymous 2xx {anonymous_2xx}; other {others} = 0",
        ),
        Criterion("clean exit", exit_status == 0, f"exit status {exit_status} on SIGTERM"),
    ]


async def _sample_during(
    load: asyncio.Task[Tally],
    traffic: Traffic,
    settings: Settings,
    sample: Callable[[float], Sample],
    samples: list[Sample],
    admin: str,
) -> None:
    """A sample at the end of the warm-up and every `sample_every` seconds after, while the
    load runs; /metrics is scraped with each."""
    await traffic.running.wait()
    tick = settings.warmup
    while tick < settings.seconds:
        wait = traffic.started + tick - time.monotonic()
        done, _ = await asyncio.wait({load}, timeout=max(0.0, wait))
        if done:
            return
        taken = sample(time.monotonic() - traffic.started)
        samples.append(taken)
        try:
            await fetch_text(admin + "/metrics")
        except (aiohttp.ClientError, OSError) as exc:
            raise GatewayDied(f"/metrics failed during the load: {exc!r}") from None
        say(
            f"  t={taken.at:5.1f}s RSS {mib(taken.rss_kib)}, fds {taken.fds.total}, sent "
            f"{sum(traffic.tally.sent.values())}"
        )
        tick += settings.sample_every


async def _quiesce(sample: Callable[[float], Sample], fixed_fds: int) -> Sample:
    """The sample once the gateway holds no client connection and no more non-connection fds
    than `fixed_fds` (a socket the client reset leaves /proc/net/tcp before the gateway closes
    it), or the last one at the deadline."""
    deadline = time.monotonic() + QUIESCE_SECONDS
    while True:
        taken = sample(-1.0)
        settled = taken.fds.clients == 0 and taken.fds.fixed <= fixed_fds
        if settled or time.monotonic() >= deadline:
            return taken
        await asyncio.sleep(0.1)


async def soak(settings: Settings) -> int:
    say(
        f"soak: {settings.seconds:.0f} s per backend (warm-up {settings.warmup:.0f} s) at "
        f"{settings.rps:.0f} requests/s from {settings.concurrency} clients, {settings.users} "
        f"users; backends: {', '.join(settings.backends)}"
    )
    for note in settings.notes:
        say(f"note: {note}")
    say(f"memory criterion: end RSS <= post-warm-up RSS x {RSS_GROWTH_LIMIT}")
    keys = Keys.generate()
    lifetime = 3600 + len(settings.backends) * (settings.seconds + 120)
    pools = await asyncio.to_thread(
        TokenPools.mint, keys.private_pem, keys.other_private_pem, KID, settings.users, lifetime
    )
    outcomes = [await soak_backend(b, settings, keys, pools) for b in settings.backends]
    say("== soak summary ==")
    for outcome in outcomes:
        failed = [c.name for c in outcome.criteria if not c.ok]
        say(f"{outcome.backend}: {'PASS' if outcome.ok else 'FAIL (' + ', '.join(failed) + ')'}")
    return 0 if all(o.ok for o in outcomes) else 1


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
        return asyncio.run(soak(settings))
    except SoakError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted; everything it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
