"""`make bench`: req/s, latency and CPU per request of the gateway beside nginx and HAProxy.

    python -m tests.bench.run

Targets, measured in interleaved rounds (every target once per round, the median round kept):

    upstream            bare nginx answering 200 (the ceiling: what the load generator reaches)
    haproxy-jwt         HAProxy jwt_verify RS256 + exp + sub = body's customer_ids.registered
    gateway-disabled    the gateway in `disabled` mode
    gateway-required    `required`, 1,000 users whose tokens are reused (the realistic case)
    gateway-python      gateway-required on the pure-Python build (PYTHONPATH unset): what
                        the compiled build gains, when `make bench` runs the compiled one
    gateway-fresh       `required`, a token never seen before on every request (every one pays RSA)
    gateway-anonymous   `required`, requests without identity or token
    gateway-redis       `required` with the Redis failure counter, traffic as gateway-required
    gateway-workers     as gateway-required with `workers: N`, one per core but the load's
                        (on a 2-core machine: 2 workers on both cores, sharing the load's)
    gateway-traced      gateway-required with tracing on at `sample_ratio: 0.01`, exporting to
                        the upstream nginx (which answers 200, as a collector would)
    haproxy-tls         haproxy-jwt terminating HTTPS itself (TLS 1.2+, a P-256 certificate)
    gateway-tls         gateway-required terminating HTTPS itself (`tls`), compared with
                        haproxy-tls; both over keep-alive connections
    *-tls-handshakes    the two above with `Connection: close` on every request: a TLS
                        handshake per request (handshakes per second)
    haproxy-million     haproxy-jwt on a million users whose request rates follow Zipf's law
                        (tests/bench/dataset.py ZipfSequence), each user's token reused
    gateway-million     gateway-required on the same sequence with the default cache size;
                        the rounds continue one stream, and each run reports the cache's hit
                        rate and the process's RSS

Environment: BENCH_SECONDS (10), BENCH_ROUNDS (3), BENCH_WARMUP_SECONDS (1, 0 = none),
BENCH_CONNECTIONS (50), BENCH_THREADS (wrk threads, 1), BENCH_TARGETS (comma-separated keys,
all by default), BENCH_MAX_FRESH_TOKENS (500000), BENCH_JSON (/tmp/gateway-bench.json),
BENCH_GATEWAY (the command that runs the gateway CLI, to compare builds or interpreters;
default: this environment's `gateway`). `make bench` runs the compiled build (PYTHONPATH names
it); the report's versions say which build the gateway targets ran.

Needs wrk and nginx (Debian: wrk nginx-light); haproxy (>= 2.5) and redis-server are optional,
their targets are skipped with a line saying why. A run with any non-2xx answer, socket error
or (fresh tokens) a token sent twice is INVALID, never reported as a rate; the exit status is
then 1.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.bench import configs, dataset, report, stack
from tests.bench.procs import (
    BenchError,
    Pinning,
    Supervisor,
    choose_pinning,
    command_output,
    free_ports,
    http_request,
)
from tests.bench.stack import Skipped, Smoke, Target, Tools
from tests.bench.wrkrun import Load, Requests, RunResult, run_wrk, wrk_command

TARGETS = {
    "upstream": "bare upstream (nginx)",
    "haproxy-jwt": "HAProxy jwt_verify RS256",
    "gateway-disabled": "gateway: disabled",
    "gateway-required": "gateway: required, 1000 users, tokens reused",
    "gateway-python": "gateway: required, 1000 users, pure-Python build",
    "gateway-fresh": "gateway: required, fresh token per request",
    "gateway-anonymous": "gateway: required, anonymous",
    "gateway-redis": "gateway: required, Redis counter",
    "gateway-workers": "gateway: required, workers: N",
    "gateway-traced": "gateway: required, 1000 users, tracing 1%",
    "haproxy-tls": "HAProxy jwt_verify RS256, HTTPS",
    "gateway-tls": "gateway: required, 1000 users, HTTPS",
    "haproxy-tls-handshakes": "HAProxy jwt_verify RS256, HTTPS, a new connection per request",
    "gateway-tls-handshakes": "gateway: required, HTTPS, a new connection per request",
    "haproxy-million": "HAProxy jwt_verify RS256, 1M users (Zipf)",
    "gateway-million": "gateway: required, 1M users (Zipf)",
}
ENV_NAMES = (
    "BENCH_SECONDS",
    "BENCH_ROUNDS",
    "BENCH_WARMUP_SECONDS",
    "BENCH_CONNECTIONS",
    "BENCH_THREADS",
    "BENCH_TARGETS",
    "BENCH_MAX_FRESH_TOKENS",
    "BENCH_JSON",
    "BENCH_GATEWAY",
)
USERS = 1000
FRESH_SAFETY = 1.5  # tokens minted per request the estimate says a fresh run can send
FRESH_FALLBACK_RPS = 5000.0
ZIPF_MIN_RPS = 20_000.0  # the least a million-user slice is sized for, whatever was seen


# --- options -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    seconds: int
    rounds: int
    warmup_seconds: int
    connections: int
    threads: int
    targets: tuple[str, ...]
    max_fresh_tokens: int
    json_path: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Options:
        default_json = Path(tempfile.gettempdir()) / "gateway-bench.json"
        return cls(
            seconds=_int(env, "BENCH_SECONDS", 10, minimum=1),
            rounds=_int(env, "BENCH_ROUNDS", 3, minimum=1),
            warmup_seconds=_int(env, "BENCH_WARMUP_SECONDS", 1, minimum=0),
            connections=_int(env, "BENCH_CONNECTIONS", 50, minimum=1),
            threads=_int(env, "BENCH_THREADS", 1, minimum=1),
            targets=_targets(env.get("BENCH_TARGETS", "")),
            max_fresh_tokens=_int(env, "BENCH_MAX_FRESH_TOKENS", 500_000, minimum=1000),
            json_path=Path(env.get("BENCH_JSON") or default_json),
        )


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise BenchError(f"{name}={raw!r}: expected a whole number >= {minimum}")
    return int(raw)


def _targets(raw: str) -> tuple[str, ...]:
    wanted = [t.strip() for t in raw.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TARGETS]
    if unknown:
        raise BenchError(f"BENCH_TARGETS: unknown {unknown}; known: {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if not wanted or t in wanted)


def exact_command(env: Mapping[str, str]) -> str:
    assignments = [f"{name}={shlex.quote(env[name])}" for name in ENV_NAMES if name in env]
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    return " ".join([*assignments, python, "-m", "tests.bench.run"])


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- what the targets need ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Material:
    public_key: Path
    reused: Requests
    anonymous: Requests
    fresh: dataset.FreshPool
    million: dataset.ZipfSequence
    smoke: Smoke
    tls: stack.BenchTls


def make_keys(gateway: tuple[str, ...], directory: Path) -> tuple[Path, Path]:
    """An RSA pair made by the gateway's own `gateway keygen`: (private, public)."""
    done = subprocess.run(
        [*gateway, "keygen", "--out-dir", str(directory), "--name", "bench"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"gateway keygen failed:\n{done.stdout}{done.stderr}")
    return directory / "bench.private.pem", directory / "bench.public.pem"


def prepare(workdir: Path, tools: Tools) -> Material:
    private_path, public_path = make_keys(tools.gateway, workdir / "keys")
    key: rsa.RSAPrivateKey = dataset.load_private_key(private_path)
    now = int(time.time())
    reused_path, anonymous_path = workdir / "reused.tsv", workdir / "anonymous.tsv"
    reused = dataset.write_lines(reused_path, dataset.reused_token_lines(key, USERS, now))
    anonymous = dataset.write_lines(anonymous_path, dataset.anonymous_lines(USERS))
    token, _, body = reused_path.read_text().splitlines()[0].split("\t")
    refused = dataset.refused_tokens(key, dataset.user_name(0), now)
    return Material(
        public_key=public_path,
        reused=Requests(reused_path, 0, reused),
        anonymous=Requests(anonymous_path, 0, anonymous),
        fresh=dataset.FreshPool(workdir / "fresh.tsv", private_path.read_bytes(), now),
        million=dataset.ZipfSequence(workdir / "million.tsv", private_path.read_bytes(), now),
        smoke=Smoke(token, body, refused),
        tls=stack.BenchTls.generate(workdir),
    )


# --- starting the targets ----------------------------------------------------------------------


@dataclass
class Ports:
    free: list[int] = field(default_factory=list)
    given: set[int] = field(default_factory=set)

    def take(self, count: int = 1) -> list[int]:
        while len(self.free) < count:  # never one handed out before, even if released since
            self.free += [p for p in free_ports(16) if p not in self.given and p not in self.free]
        taken, self.free = self.free[:count], self.free[count:]
        self.given.update(taken)
        return taken


def start_targets(
    sup: Supervisor, tools: Tools, pinning: Pinning, material: Material, wanted: tuple[str, ...]
) -> list[Target | Skipped]:
    ports = Ports()
    (upstream_port,) = ports.take()
    stack.start_nginx(sup, tools.nginx, "nginx-upstream", upstream_port, pinning.load)
    reused, smoke = material.reused, material.smoke
    started: list[Target | Skipped] = []
    for key in wanted:
        label = TARGETS[key]
        progress(f"starting {key}")
        if key == "upstream":
            (port,) = ports.take()
            service = stack.start_nginx(sup, tools.nginx, "nginx-bare", port, pinning.proxy)
            started.append(Target(key, label, port, service, reused, reused))
        elif key.startswith("haproxy-"):
            (port,) = ports.take()
            tls = material.tls if "-tls" in key else None
            outcome = stack.start_haproxy(
                sup,
                tools.haproxy,
                port,
                upstream_port,
                material.public_key,
                pinning.proxy,
                smoke,
                tls,
            )
            if isinstance(outcome, str):
                progress(f"SKIPPING {key}: {outcome}")
                started.append(Skipped(key, label, outcome))
            else:
                version = stack.haproxy_version(tools.haproxy or "")
                if version is not None:
                    label = f"HAProxy {version[0]}.{version[1]} jwt_verify RS256"
                    label += TARGETS[key].removeprefix("HAProxy jwt_verify RS256")
                scheme = "https" if tls else "http"
                sent = with_close(reused) if key.endswith("-handshakes") else reused
                drawn = zipf_cursor(material, key)
                started.append(Target(key, label, port, outcome, sent, sent, drawn, scheme=scheme))
        else:
            started.append(
                start_gateway_target(sup, tools, pinning, material, key, upstream_port, ports)
            )
    return started


def start_gateway_target(
    sup: Supervisor,
    tools: Tools,
    pinning: Pinning,
    material: Material,
    key: str,
    upstream_port: int,
    ports: Ports,
) -> Target | Skipped:
    label = TARGETS[key]
    redis_port: int | None = None
    if key == "gateway-redis":
        if tools.redis is None:
            reason = "redis-server not found (Debian: apt-get install -y redis-server)"
            progress(f"SKIPPING {key}: {reason}")
            return Skipped(key, label, reason)
        (redis_port,) = ports.take()
        stack.start_redis(sup, tools.redis, redis_port, pinning.load)
    mode = "disabled" if key == "gateway-disabled" else "required"
    tls = material.tls if "-tls" in key else None
    # nginx answers the exporter's POSTs 200, as a collector would.
    traces_to = f"http://127.0.0.1:{upstream_port}/v1/traces" if key == "gateway-traced" else None
    workers, cores, prefix = 1, 1, pinning.proxy
    if key == "gateway-workers":
        workers, cores, prefix = pinning.worker_cores, pinning.worker_cores, pinning.workers
        label = workers_label(workers, pinning.workers_share_load_core)

    def settings(port: int, admin_port: int) -> dict[str, object]:
        return configs.gateway_config(
            port=port,
            admin_port=admin_port,
            upstream_port=upstream_port,
            public_key=material.public_key,
            mode=mode,
            redis_port=redis_port,
            workers=workers,
            tls=(tls.cert, tls.key) if tls is not None else None,
            traces_to=traces_to,
        )

    gateway = tools.gateway
    if key == "gateway-python":  # the sources the editable install names, not PYTHONPATH's build
        gateway = ("/usr/bin/env", "-u", "PYTHONPATH", "-u", "PYTHONSAFEPATH", *gateway)
    port, admin_port = ports.take(2)
    service = stack.start_gateway(sup, gateway, key, settings, (port, admin_port), prefix)
    smoke = material.smoke
    if mode == "disabled":
        smoke = Smoke(smoke.token, smoke.body)  # disabled forwards any token
    stack.require_smoke(label, port, smoke, tls.client if tls is not None else None)
    requests = material.anonymous if key == "gateway-anonymous" else material.reused
    if key.endswith("-handshakes"):
        requests = with_close(requests)
    fresh = material.fresh if key == "gateway-fresh" else zipf_cursor(material, key)
    return Target(
        key,
        label,
        port,
        service,
        requests,
        requests,
        fresh,
        cores=cores,
        shares_load_core=key == "gateway-workers" and pinning.workers_share_load_core,
        scheme="https" if tls is not None else "http",
        admin_port=admin_port,
    )


def zipf_cursor(material: Material, key: str) -> dataset.ZipfCursor | None:
    return dataset.ZipfCursor(material.million) if key.endswith("-million") else None


def with_close(requests: Requests) -> Requests:
    return Requests(requests.path, requests.first, requests.count, close=True)


def workers_label(workers: int, shared: bool) -> str:
    where = f"{workers} cores, one shared with the load" if shared else f"{workers} cores"
    return f"gateway: required, workers: {workers} on {where}"


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Estimates:
    """The fastest gateway rate seen so far: an upper bound for the fresh-token target."""

    gateway_rps: float = 0.0

    def note(self, key: str, rps: float) -> None:
        if key.startswith("gateway-"):
            self.gateway_rps = max(self.gateway_rps, rps)

    def fresh_tokens(self, seconds: int, cap: int) -> int:
        rps = self.gateway_rps or FRESH_FALLBACK_RPS
        return min(cap, math.ceil(rps * seconds * FRESH_SAFETY) + 1000)


def measure_once(
    target: Target, round_index: int, load: Load, options: Options, estimates: Estimates
) -> RunResult:
    if options.warmup_seconds:
        warm = run_wrk(
            load,
            target.url,
            options.warmup_seconds,
            target.warmup,
            target=target.key,
            round_index=round_index,
            cpu_pids=target.cpu_pids,
            reuse_is_invalid=False,
        )
        estimates.note(target.key, warm.rps)
    requests = target.requests
    if target.fresh is not None:
        count = estimates.fresh_tokens(options.seconds, options.max_fresh_tokens)
        if isinstance(target.fresh, dataset.ZipfCursor):
            # Never short: a slice sent twice would read as cache hits.
            count = max(count, math.ceil(ZIPF_MIN_RPS * options.seconds * FRESH_SAFETY))
        took = target.fresh.ensure(count)
        if took:
            progress(f"drew requests up to {target.fresh.size:,} for {target.key} in {took:.1f}s")
        requests = Requests(target.fresh.path, target.fresh.used, count)
    cache_before = cache_counts(target)
    result = run_wrk(
        load,
        target.url,
        options.seconds,
        requests,
        target=target.key,
        round_index=round_index,
        cpu_pids=target.cpu_pids,
        reuse_is_invalid=isinstance(target.fresh, dataset.FreshPool)
        or target.key == "gateway-million",
    )
    if target.fresh is not None:
        target.fresh.take(result.consumed)
    if isinstance(target.fresh, dataset.ZipfCursor) and cache_before is not None:
        hits, misses = (
            a - b for a, b in zip(cache_counts(target) or (0, 0), cache_before, strict=True)
        )
        result.cache_hit_percent = hits / (hits + misses) * 100 if hits + misses else None
        result.rss_mib = rss_mib(target.cpu_pids())
    estimates.note(target.key, result.rps)
    return result


def cache_counts(target: Target) -> tuple[float, float] | None:
    """The gateway's verified-token cache (hits, misses) so far, from its /metrics."""
    if target.admin_port is None or not isinstance(target.fresh, dataset.ZipfCursor):
        return None
    text = http_request(target.admin_port, "GET", "/metrics").body.decode()
    found = dict(re.findall(r'gateway_verified_token_cache_total\{result="(\w+)"\} (\S+)', text))
    return float(found.get("hit", 0)), float(found.get("miss", 0))


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def describe_run(result: RunResult) -> str:
    verdict = "ok" if result.valid else "INVALID: " + "; ".join(result.problems)
    cpu = result.cpu_us_per_request
    return (
        f"round {result.round} {result.target}: {result.rps:,.0f} req/s "
        f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms "
        f"CPU {cpu if cpu is None else round(cpu)} µs/req ({result.cpu_percent:.0f}%) {verdict}"
    )


def measure(started: list[Target | Skipped], load: Load, options: Options) -> list[report.Row]:
    rows = [
        report.Row(t.key, t.label, [], t.reason)
        if isinstance(t, Skipped)
        else report.Row(t.key, t.label, [], cores=t.cores, shares_load_core=t.shares_load_core)
        for t in started
    ]
    estimates = Estimates()
    targets = [t for t in started if isinstance(t, Target)]
    for round_index in range(1, options.rounds + 1):
        for target in targets:
            result = measure_once(target, round_index, load, options, estimates)
            progress(describe_run(result))
            next(r for r in rows if r.key == target.key).runs.append(result)
    return rows


# --- context -----------------------------------------------------------------------------------


def _version(argv: list[str], pattern: str) -> str:
    """The version `argv` prints, as `pattern`'s first group finds it (else its first line)."""
    text = command_output(argv)
    found = re.search(pattern, text)
    if found:
        return found[1]
    return text.splitlines()[0] if text else "unknown"


def versions(tools: Tools) -> dict[str, str]:
    found = {
        "wrk": _version([tools.wrk, "-v"], r"wrk (\S+)"),
        "nginx": _version([tools.nginx, "-v"], r"nginx/(\S+)"),
        "haproxy": _version([tools.haproxy, "-v"], r"version (\S+)")
        if tools.haproxy
        else "not installed",
        "redis": _version([tools.redis, "--version"], r"v=(\S+)")
        if tools.redis
        else "not installed",
        "python": platform.python_version(),
        "openssl": openssl_backend.openssl_version_text().removeprefix("OpenSSL "),
    }
    for package in ("aiohttp", "uvloop", "cryptography"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    # "0.1.0 (compiled)": the build the gateway targets run, as the CLI reports it.
    found["gateway"] = _version([*tools.gateway, "--version"], r"gateway (.+)")
    return found


def context(options: Options, tools: Tools, pinning: Pinning, load: Load) -> dict[str, Any]:
    return {
        "command": exact_command(os.environ),
        "wrk_command": " ".join(wrk_command(load, "URL", options.seconds)),
        "settings": {
            "seconds": options.seconds,
            "rounds": options.rounds,
            "warmup_seconds": options.warmup_seconds,
            "connections": options.connections,
            "wrk_threads": options.threads,
            "body_bytes": dataset.BODY_BYTES,
            "users": USERS,
            "path": dataset.PATH,
        },
        "machine": report.machine(),
        "pinning": pinning.description,
        "versions": versions(tools),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_report(rows: list[report.Row], info: dict[str, Any], json_path: Path) -> None:
    machine, settings = info["machine"], info["settings"]
    lines = [
        "",
        f"machine:  {machine['cpu_model']}, nproc {machine['nproc']}, "
        f"kernel {machine['kernel']}; {info['pinning']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"command:  {info['command']}",
        f"load:     {info['wrk_command']}",
        f"          {settings['connections']} connections, {settings['body_bytes']}-byte JSON "
        f"bodies, {settings['seconds']} s per run, median of {settings['rounds']} interleaved "
        f"round(s), {settings['warmup_seconds']} s warm-up before each run",
        "",
        report.table(rows),
        "",
        *report.footnotes(rows),
        "proxy CPU: user+system time of the process under test (nginx worker, haproxy or "
        "gateway) during the run, per request; in kernel: the share of it spent in system calls",
        f"JSON:     {json_path}",
    ]
    print("\n".join(lines), flush=True)


# --- main --------------------------------------------------------------------------------------


def run(options: Options) -> int:
    tools = stack.find_tools()
    pinning = choose_pinning()
    load = Load(
        tools.wrk,
        pinning.load,
        options.connections,
        options.threads,
        pinning.proxy_core,
        pinning.load_core,
    )
    info = context(options, tools, pinning, load)
    progress(f"{pinning.description}; targets: {', '.join(options.targets)}")
    with (
        tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp,
        Supervisor(Path(tmp)) as sup,
    ):
        material = prepare(sup.workdir, tools)
        started = start_targets(sup, tools, pinning, material, options.targets)
        rows = measure(started, load, options)
    report.write_json(options.json_path, report.as_json(rows, info))
    print_report(rows, info, options.json_path)
    measured = [row for row in rows if row.skipped is None]
    return 0 if all(row.valid for row in measured) else 1


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the Supervisor, which stops every process


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(Options.from_env(os.environ))
    except BenchError as exc:
        print(f"bench: FAILED: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
