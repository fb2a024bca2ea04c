"""Where a gateway request's time goes: py-spy on one gateway target while wrk loads it.

    python -m tests.bench.hotspots

Starts the same upstream and gateway as `tests.bench.run` (same pinning), warms it up, then
records with `py-spy record --format speedscope` (pip install py-spy) for the length of one
wrk run and prints the functions with the most samples: inclusive (on the stack) and self
(on top of it). Environment: PROFILE_TARGET (gateway-required; any gateway-* key of run.py),
PROFILE_SECONDS (15), PROFILE_RATE (samples/s, 100), PROFILE_NATIVE (1: C frames too),
PROFILE_OUT (/tmp/gateway-profile.speedscope.json), PROFILE_TOP (30).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import run, stack
from tests.bench.procs import BenchError, Supervisor, choose_pinning, free_ports
from tests.bench.wrkrun import Load, Requests, RunResult, run_wrk


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.name} ({self.short_file}:{self.line})"

    @property
    def short_file(self) -> str:
        for marker in ("site-packages/", "/gateway/", "lib/python"):
            if marker in self.file:
                tail = self.file.split(marker, 1)[1]
                return ("gateway/" if marker == "/gateway/" else "") + tail
        return self.file


@dataclass(frozen=True, slots=True)
class Summary:
    samples: float  # py-spy weighs samples in seconds
    inclusive: Counter[Frame]
    self_time: Counter[Frame]
    by_file: Counter[str]
    by_gateway_function: Counter[str]


def summarise(speedscope: dict[str, Any]) -> Summary:
    """Sample counts per frame from py-spy's speedscope output (all threads together)."""
    frames = [
        Frame(f.get("name", "?"), f.get("file", "?"), int(f.get("line") or 0))
        for f in speedscope["shared"]["frames"]
    ]
    inclusive: Counter[Frame] = Counter()
    self_time: Counter[Frame] = Counter()
    by_file: Counter[str] = Counter()
    by_gateway_function: Counter[str] = Counter()
    total = 0.0
    for profile in speedscope["profiles"]:
        for stack_ids, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack_ids:
                continue
            total += weight
            on_stack = {frames[i] for i in stack_ids}
            for frame in on_stack:
                inclusive[frame] += weight
            top = frames[stack_ids[-1]]
            self_time[top] += weight
            by_file[top.short_file] += weight
            by_gateway_function[_innermost_gateway(frames[i] for i in stack_ids)] += weight
    return Summary(total, inclusive, self_time, by_file, by_gateway_function)


def _innermost_gateway(stack_frames: Iterable[Frame]) -> str:
    """The deepest gateway/ function on a stack (what it calls, aiohttp included, counts as its
    own), or what runs outside gateway code: the aiohttp server and the event loop."""
    last = None
    for frame in stack_frames:
        if frame.short_file.startswith("gateway/") and frame.name not in ("main", "cmd_run"):
            last = frame
    return str(last) if last else "(outside gateway code: aiohttp server, event loop, GC)"


def render(summary: Summary, top: int) -> str:
    def block(title: str, counts: Counter[Any]) -> list[str]:
        lines = [title]
        for item, n in counts.most_common(top):
            lines.append(f"  {n / summary.samples * 100:5.1f}%  {item}")
        return lines

    return "\n".join(
        [
            f"{summary.samples:.1f} s of samples",
            *block("inclusive (the function or what it calls is running):", summary.inclusive),
            *block("self (the function itself is on top of the stack):", summary.self_time),
            *block("self, by file:", summary.by_file),
            *block(
                "by innermost gateway function (its own time plus the libraries it calls):",
                summary.by_gateway_function,
            ),
        ]
    )


def record(
    py_spy: str,
    pid: int,
    seconds: int,
    rate: int,
    out: Path,
    *,
    prefix: Sequence[str],
    native: bool,
) -> subprocess.Popen[bytes]:
    """py-spy on the load core, stacks aggregated per function (not per line)."""
    argv = [
        *prefix,
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(rate),
        "--function",
        "--format",
        "speedscope",
        "--output",
        str(out),
        *(["--native"] if native else []),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def load_gateway(
    load: Load, target: stack.Target, requests: Requests, seconds: int, round_index: int
) -> RunResult:
    return run_wrk(
        load,
        target.url,
        seconds,
        requests,
        target=target.key,
        round_index=round_index,
        cpu_pids=target.cpu_pids,
        reuse_is_invalid=target.fresh is not None and requests is not target.warmup,
    )


def find_py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy not found: pip install py-spy (into this environment)")
    return found


def profile(target_key: str, seconds: int, rate: int, out: Path, top: int, *, native: bool) -> str:
    if not target_key.startswith("gateway-"):
        raise BenchError(f"PROFILE_TARGET={target_key}: only gateway-* targets run Python")
    py_spy = find_py_spy()
    tools = stack.find_tools()
    pinning = choose_pinning()
    load = Load(tools.wrk, pinning.load, 50, 1, pinning.proxy_core, pinning.load_core)
    with (
        tempfile.TemporaryDirectory(prefix="gateway-profile-") as tmp,
        Supervisor(Path(tmp)) as sup,
    ):
        material = run.prepare(sup.workdir, tools)
        (upstream_port,) = free_ports(1)
        stack.start_nginx(sup, tools.nginx, "nginx-upstream", upstream_port, pinning.load)
        target = run.start_gateway_target(
            sup, tools, pinning, material, target_key, upstream_port, run.Ports()
        )
        if isinstance(target, stack.Skipped):
            raise BenchError(f"{target_key} skipped: {target.reason}")
        requests = target.requests
        if target.fresh is not None:
            target.fresh.ensure(run.Estimates(8000.0).fresh_tokens(seconds, 2_000_000))
            requests = Requests(target.fresh.path, 0, target.fresh.size)
        load_gateway(load, target, target.warmup, 2, round_index=0)  # warm-up, not recorded
        recorder = record(
            py_spy, target.service.pid, seconds, rate, out, prefix=pinning.load, native=native
        )
        result = load_gateway(load, target, requests, seconds, round_index=1)
        _, errors = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0:
            raise BenchError(f"py-spy failed: {errors.decode(errors='replace')}")
    summary = summarise(json.loads(out.read_text()))
    header = run.describe_run(result)
    return f"{header}\nprofile: {out}\n{render(summary, top)}"


def main() -> int:
    env = os.environ
    try:
        print(
            profile(
                env.get("PROFILE_TARGET", "gateway-required"),
                int(env.get("PROFILE_SECONDS", "15")),
                int(env.get("PROFILE_RATE", "100")),
                Path(
                    env.get("PROFILE_OUT")
                    or Path(tempfile.gettempdir()) / "gateway-profile.speedscope.json"
                ),
                int(env.get("PROFILE_TOP", "30")),
                native=env.get("PROFILE_NATIVE", "") == "1",
            )
        )
    except BenchError as exc:
        print(f"hotspots: FAILED: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
