"""The medians of the rounds as one table, and the same (plus every run) as JSON."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.wrkrun import RunResult

BASELINE_UPSTREAM = "upstream"
BASELINE_HAPROXY = "haproxy-jwt"
BASELINE_HAPROXY_TLS = "haproxy-tls"  # what the TLS targets are compared with


def haproxy_for(key: str) -> str:
    """The HAProxy target a gateway target is compared with: the same transport and traffic."""
    if key.endswith("-tls-handshakes"):
        return "haproxy-tls-handshakes"
    if key.endswith("-million"):
        return "haproxy-million"
    return BASELINE_HAPROXY_TLS if key.endswith("-tls") else BASELINE_HAPROXY


ONE_PROCESS = "gateway-required"  # what the workers target is compared with
WORKERS = "gateway-workers"


@dataclass
class Row:
    key: str
    label: str
    runs: list[RunResult]
    skipped: str | None = None
    cores: int = 1  # the cores the proxy may use: its CPU % saturates at 100 per core
    shares_load_core: bool = False  # one of them is also the load generator's

    @property
    def median(self) -> RunResult | None:
        """The run with the median req/s (the lower middle one for an even count)."""
        if not self.runs:
            return None
        ordered = sorted(self.runs, key=lambda r: r.rps)
        return ordered[(len(ordered) - 1) // 2]

    @property
    def valid(self) -> bool:
        return self.skipped is None and bool(self.runs) and all(r.valid for r in self.runs)

    @property
    def non_2xx(self) -> int:
        return sum(r.non_2xx for r in self.runs)

    @property
    def problems(self) -> list[str]:
        return [f"round {r.round}: {p}" for r in self.runs for p in r.problems]

    def rps(self) -> float | None:
        median = self.median
        return median.rps if self.valid and median is not None else None


def ratio(row: Row, baseline: Row | None) -> str:
    mine = row.rps()
    theirs = baseline.rps() if baseline is not None else None
    if mine is None or not theirs:
        return "n/a"
    return f"{mine / theirs:.3f}"


def round_ratios(row: Row, baseline: Row | None) -> list[float]:
    """Each round's req/s over the baseline's in the same round: rounds interleave targets, so
    a pair shares the machine's mood, which on a shared machine moves more than the median."""
    if baseline is None or not row.valid or not baseline.valid:
        return []
    theirs = {run.round: run.rps for run in baseline.runs}
    return sorted(run.rps / theirs[run.round] for run in row.runs if theirs.get(run.round))


def ratio_range(row: Row, baseline: Row | None) -> str:
    ratios = round_ratios(row, baseline)
    if row is baseline or len(ratios) < 2:
        return "-"
    return f"{ratios[0]:.2f} to {ratios[-1]:.2f}"


def _cells(row: Row, rows: dict[str, Row]) -> list[str]:
    if row.skipped is not None:
        return [row.label, "skipped", *[""] * (len(HEADERS) - 2)]
    median = row.median
    assert median is not None
    if not row.valid:  # fast refusals must not read as a fast proxy: no figure but the count
        invalid = [row.label, "INVALID", "-", "-", str(row.non_2xx), "-", "-", "-", "-"]
        return [*invalid, "n/a", "n/a", "n/a"]
    cpu = median.cpu_us_per_request
    load = median.load_core_percent
    kernel = median.kernel_percent
    return [
        row.label,
        f"{median.rps:,.0f}",
        f"{median.p50_ms:.2f}",
        f"{median.p99_ms:.2f}",
        str(row.non_2xx),
        f"{cpu:.0f}" if cpu is not None else "n/a",
        f"{median.cpu_percent:.0f}",
        f"{kernel:.0f}" if kernel is not None else "n/a",
        f"{load:.0f}" if load is not None else "n/a",
        ratio(row, rows.get(haproxy_for(row.key))),
        ratio_range(row, rows.get(haproxy_for(row.key))),
        ratio(row, rows.get(BASELINE_UPSTREAM)),
    ]


HEADERS = [
    "target",
    "req/s",
    "p50 ms",
    "p99 ms",
    "non-2xx",
    "proxy CPU µs/req",
    "proxy CPU %",
    "in kernel %",
    "load core %",
    "vs HAProxy-jwt",
    "per round",
    "vs bare upstream",
]


def table(rows: Sequence[Row]) -> str:
    by_key = {row.key: row for row in rows}
    lines = [HEADERS, *(_cells(row, by_key) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]

    def render(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(lines[0]), rule, *(render(cells) for cells in lines[1:])])


SATURATED_PERCENT = 90.0


def footnotes(rows: Sequence[Row]) -> list[str]:
    notes = []
    by_key = {row.key: row for row in rows}
    for row in rows:
        median = row.median
        if row.skipped is not None:
            notes.append(f"{row.label}: SKIPPED: {row.skipped}")
        elif not row.valid:
            notes.extend(f"{row.label}: INVALID: {p}" for p in row.problems)
        elif (
            median is not None
            and not row.shares_load_core  # the scaling note says what limited it
            and median.cpu_percent < SATURATED_PERCENT * row.cores
        ):
            notes.append(f"{row.label}: {unsaturated(median, row.cores)}")
        if row.key == WORKERS and (grown := scaling(row, by_key.get(ONE_PROCESS))):
            notes.append(grown)
        if row.valid and (cache := cache_use(row)):
            notes.append(cache)
    return notes


def cache_use(row: Row) -> str | None:
    """The verified-token cache's hit rate and the process's memory, round by round."""
    rounds = [r for r in row.runs if r.cache_hit_percent is not None and r.rss_mib is not None]
    if not rounds:
        return None
    said = ", ".join(
        f"round {r.round} {r.cache_hit_percent:.1f}% hits, RSS {r.rss_mib:.0f} MiB" for r in rounds
    )
    return f"{row.label}: verified-token cache {said}"


def scaling(workers: Row, single: Row | None) -> str | None:
    """The `workers: N` rate and CPU per request against one process's."""
    mine, theirs = workers.median, single.median if single is not None else None
    if not workers.valid or single is None or not single.valid or not mine or not theirs:
        return None
    grown = mine.rps / theirs.rps
    cost = (
        f" at {mine.cpu_us_per_request / theirs.cpu_us_per_request:.2f}x its CPU per request"
        if mine.cpu_us_per_request and theirs.cpu_us_per_request
        else ""
    )
    said = f"{workers.label}: {grown:.2f}x the one-process rate{cost}"
    if workers.shares_load_core:
        return (
            f"{said}; the second core is shared with wrk and the upstream, so N-fold is out of "
            "reach here: the CPU per request is what says whether the processes scale"
        )
    return f"{said}, {grown / workers.cores:.2f} of N-fold"


def unsaturated(run: RunResult, cores: int = 1) -> str:
    """Why a proxy that did not use its whole core (or cores) got no further."""
    own, core, load = run.cpu_percent, run.proxy_core_percent, run.load_core_percent
    said = f"the proxy used {own:.0f}% of " + ("a core" if cores == 1 else f"{cores} cores")
    if core is None or load is None:
        return f"{said} (not pinned): the rate may be the load generator's limit"
    if cores == 1 and core - own >= 100 - SATURATED_PERCENT:
        return (
            f"{said}; its core was {core:.0f}% busy: other processes shared it, "
            "so this rate is noisy (run again on a quiet machine)"
        )
    if load >= SATURATED_PERCENT:
        return (
            f"{said} while the load core (wrk + upstream) was {load:.0f}% busy: "
            "the load generator set this rate, a lower bound for the proxy"
        )
    return f"{said}, the load core {load:.0f}%: neither was saturated (latency-bound)"


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
    }


def as_json(rows: Sequence[Row], context: dict[str, Any]) -> dict[str, Any]:
    by_key = {row.key: row for row in rows}
    targets = []
    for row in rows:
        median = row.median
        targets.append(
            {
                "key": row.key,
                "label": row.label,
                "skipped": row.skipped,
                "valid": row.valid,
                "problems": row.problems,
                "median": median.as_json() if median else None,
                "non_2xx_total": row.non_2xx,
                "ratio_to_haproxy_jwt": _float_ratio(row, by_key.get(haproxy_for(row.key))),
                "ratios_to_haproxy_jwt_per_round": round_ratios(
                    row, by_key.get(haproxy_for(row.key))
                ),
                "ratio_to_upstream": _float_ratio(row, by_key.get(BASELINE_UPSTREAM)),
                "cores": row.cores,
                "ratio_to_one_process": _float_ratio(row, by_key.get(ONE_PROCESS))
                if row.key == WORKERS
                else None,
                "runs": [r.as_json() for r in row.runs],
            }
        )
    return {**context, "targets": targets}


def _float_ratio(row: Row, baseline: Row | None) -> float | None:
    mine = row.rps()
    theirs = baseline.rps() if baseline is not None else None
    return mine / theirs if mine is not None and theirs else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
