"""One wrk run against one target, with the proxy's CPU time measured around it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.procs import BenchError, core_ticks, cpu_seconds

LUA_SCRIPT = Path(__file__).with_name("requests.lua")
RESULT_MARKER = "BENCH_RESULT "


@dataclass(frozen=True, slots=True)
class Load:
    """How hard to push: the same for every target."""

    wrk: str
    prefix: tuple[str, ...]  # taskset for the load core, or nothing
    connections: int
    threads: int
    # The pinned cores, to tell afterwards what limited the rate (and whether others ran there).
    proxy_core: int | None = None
    load_core: int | None = None
    timeout_seconds: int = 10


@dataclass(frozen=True, slots=True)
class Requests:
    """A slice of a request file (see requests.lua)."""

    path: Path
    first: int
    count: int
    close: bool = False  # `Connection: close` on every request: a new connection for each


@dataclass
class RunResult:
    target: str
    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    non_2xx: int
    wraps: int  # times a wrk thread ran out of its slice and started it again
    calls: int  # requests wrk built (sent or in flight)
    consumed: int  # lines of the slice that may have been sent (the fresh-token pool's use)
    proxy_cpu_seconds: float
    cpu_us_per_request: float | None
    cpu_percent: float
    proxy_core_percent: float | None  # how busy the proxy's core was, whoever used it
    load_core_percent: float | None  # how busy the core of wrk and the upstream was
    command: str
    kernel_percent: float | None = None  # the proxy's CPU time spent in the kernel (syscalls)
    cache_hit_percent: float | None = None  # the gateway's verified-token cache, this run
    rss_mib: float | None = None  # the gateway's resident memory after the run
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items()}
        data["valid"] = self.valid
        return data


class CoreUse:
    """How busy two cores were (all processes, from /proc/stat) from creation to `percent()`."""

    def __init__(self, *cores: int | None) -> None:
        self._cores = cores
        self._before = [core_ticks(c) if c is not None else None for c in cores]

    def percent(self) -> tuple[float | None, ...]:
        out: list[float | None] = []
        for core, before in zip(self._cores, self._before, strict=True):
            if core is None or before is None:
                out.append(None)
                continue
            busy, total = (a - b for a, b in zip(core_ticks(core), before, strict=True))
            out.append(busy / total * 100 if total else None)
        return tuple(out)


def wrk_command(load: Load, url: str, seconds: float) -> list[str]:
    return [
        *load.prefix,
        load.wrk,
        f"-t{load.threads}",
        f"-c{load.connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={load.timeout_seconds}s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        url,
    ]


def run_wrk(
    load: Load,
    url: str,
    seconds: float,
    requests: Requests,
    *,
    target: str,
    round_index: int,
    cpu_pids: Callable[[], Sequence[int]],
    reuse_is_invalid: bool,
) -> RunResult:
    argv = wrk_command(load, url, seconds)
    env = {
        **os.environ,
        "BENCH_DATA": str(requests.path),
        "BENCH_FIRST": str(requests.first),
        "BENCH_COUNT": str(requests.count),
        "BENCH_THREADS": str(load.threads),
        "BENCH_CLOSE": "1" if requests.close else "0",
    }
    pids = list(cpu_pids())
    user_before, system_before = cpu_seconds(pids)
    cores = CoreUse(load.proxy_core, load.load_core)
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=seconds + 120, check=False
    )
    user_after, system_after = cpu_seconds(pids)
    user, system = user_after - user_before, system_after - system_before
    proxy_core_percent, load_core_percent = cores.percent()
    if done.returncode != 0 or RESULT_MARKER not in done.stdout:
        raise BenchError(
            f"wrk failed on {target} (exit {done.returncode}): {shlex.join(argv)}\n"
            f"{done.stdout}\n{done.stderr}"
        )
    raw = _parse(done.stdout)
    command = " ".join(
        [
            f"BENCH_DATA={requests.path} BENCH_FIRST={requests.first}",
            f"BENCH_COUNT={requests.count} BENCH_THREADS={load.threads}",
            f"BENCH_CLOSE={1 if requests.close else 0}",
            shlex.join(argv),
        ]
    )
    result = _result(raw, target, round_index, user + system, load.threads, command)
    result.kernel_percent = system / (user + system) * 100 if user + system > 0 else None
    result.proxy_core_percent = proxy_core_percent
    result.load_core_percent = load_core_percent
    result.problems = _problems(result, reuse_is_invalid)
    return result


def _parse(stdout: str) -> dict[str, Any]:
    line = next(x for x in stdout.splitlines() if x.startswith(RESULT_MARKER))
    parsed: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
    return parsed


def _result(
    raw: dict[str, Any], target: str, round_index: int, cpu: float, threads: int, command: str
) -> RunResult:
    seconds = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    statuses = {str(k): int(v) for k, v in sorted(raw["statuses"].items())}
    errors = {k: int(v) for k, v in raw["errors"].items() if k != "status"}
    latency = raw["latency_us"]
    return RunResult(
        target=target,
        round=round_index,
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds > 0 else 0.0,
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        max_ms=latency["max"] / 1000,
        statuses=statuses,
        socket_errors=errors,
        non_2xx=sum(n for code, n in statuses.items() if not 200 <= int(code) < 300),
        wraps=int(raw["wraps"]),
        calls=int(raw["calls"]),
        consumed=int(raw["max_thread_calls"]) * threads,
        proxy_cpu_seconds=cpu,
        cpu_us_per_request=cpu / requests * 1e6 if requests else None,
        cpu_percent=cpu / seconds * 100 if seconds > 0 else 0.0,
        proxy_core_percent=None,
        load_core_percent=None,
        command=command,
    )


def _problems(result: RunResult, reuse_is_invalid: bool) -> list[str]:
    problems = []
    if result.requests == 0:
        problems.append("no request completed")
    if result.non_2xx:
        refused = {code: n for code, n in result.statuses.items() if not code.startswith("2")}
        problems.append(f"{result.non_2xx} non-2xx answers {refused}")
    if any(result.socket_errors.values()):
        problems.append(f"socket errors {result.socket_errors}")
    if reuse_is_invalid and result.wraps:
        problems.append("token pool exhausted: tokens were sent twice")
    return problems
