"""The gateway against real upstream parsers: what it authorised is all any of them reads.

Five tracking APIs (tests/differential/) read requests the way their stacks do: Python's
`json` behind `http.server`, Django, Node with Express's body-parser and `qs`, Go's
`encoding/json` and `net/url`, and C with cJSON. Each one records, for every request it
processed, the `X-Auth-Status` and `X-Authenticated-User` it received and every value it read
at the places the gateway's route reads identity from. A corpus of hostile requests (alice's
valid token, bob named in a second reading; see tests/differential/corpus.py) goes through a
gateway in front of each, and the property is:

- a request forwarded as `verified` for U is read by every upstream as U or as no user;
- a request forwarded as `anonymous` is read by every upstream as no user;
- every request an upstream processed is one the gateway forwarded, with that verdict.

Requests the gateway refused are only counted. `GATEWAY_DIFFERENTIAL=deep` adds thousands of
generated variants. A stack that cannot be had on this machine is skipped alone, saying why.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import GatewayFactory, RunningGateway, Tokens, eventually
from tests.differential.corpus import METHODS, ROUTES, Case, deep_cases, default_cases
from tests.differential.stacks import STACKS, RunningStack, command_or_reason, started

DEEP = os.environ.get("GATEWAY_DIFFERENTIAL") == "deep"
FORWARDED = ("verified", "anonymous")
USER = "alice"  # the subject of the corpus's token


def gateway_routes() -> list[dict[str, Any]]:
    routes = []
    for name, spec in ROUTES.items():
        identity = [{"json": path} for path in spec["json"]]
        identity += [{"header": header} for header in spec["header"]]
        identity += [{"query": query} for query in spec["query"]]
        routes.append(
            {
                "name": name,
                "methods": METHODS.get(name, ["POST"]),
                "path": f"/track/v2/projects/{{project}}{spec['suffix']}",
                "auth": ["sdk_jwt"],
                "identity": identity,
            }
        )
    return routes


@dataclass(frozen=True)
class Verdict:
    """What the gateway did with one request: its answer and, from its log, its decision."""

    status: int | None
    decision: str | None
    reason: str | None

    def __str__(self) -> str:
        if self.decision in FORWARDED:
            return f"forwarded as {self.decision} (answer {self.status})"
        return f"refused {self.status} {self.reason or ''}".rstrip()


@dataclass
class Run:
    """One stack's run of the corpus: the gateway's verdicts and the stack's records."""

    verdicts: dict[str, Verdict]
    seconds: float
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by case id


@dataclass
class Corpus:
    cases: dict[str, Case]  # by request id
    runs: dict[str, Run | str]  # by stack: its run, or why it could not be had
    seconds: float = 0.0


_corpus: list[Corpus] = []  # computed once, by whichever stack's test runs first


async def send(port: int, data: bytes) -> int | None:
    """One request on its own connection; the status of the answer (None: none came)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(15):
            answer = await reader.read()  # every request says `Connection: close`
    except (TimeoutError, ConnectionError):
        return None
    finally:
        writer.close()
    status_line = answer.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else None


async def run_stack(
    stack: RunningStack,
    start_gateway: Callable[[], Awaitable[RunningGateway]],
    cases: dict[str, Case],
    token: str,
) -> Run:
    started_at = asyncio.get_running_loop().time()
    shared = await start_gateway()
    gateways: dict[str, RunningGateway] = {}
    statuses: dict[str, int | None] = {}
    for rid, case in cases.items():
        gateway = gateways[rid] = await start_gateway() if case.isolated else shared
        statuses[rid] = await send(gateway.port, case.raw(rid, token))
    sent = Counter(id(gateway) for gateway in gateways.values())
    distinct = {id(gateway): gateway for gateway in gateways.values()}

    async def all_logged() -> bool:
        return all(len(distinct[key].log_lines) >= count for key, count in sent.items())

    # One access-log line per request, flushed every 0.2 s: by then every forwarded request
    # has been answered, and its record taken before the answer was written.
    await eventually(all_logged, f"{stack.name}'s gateways to log the corpus")
    verdicts = {}
    for rid, status in statuses.items():
        logged = next((line for line in gateways[rid].log_lines if line["request_id"] == rid), {})
        verdicts[rid] = Verdict(status, logged.get("decision"), logged.get("reason"))
    run = Run(verdicts, asyncio.get_running_loop().time() - started_at)
    for record in await stack.records():
        rid = str(record.get("request_id"))
        run.records.setdefault(rid.split("-", 1)[0], []).append(record)
    return run


async def run_corpus(make_gateway: GatewayFactory, tokens: Tokens) -> Corpus:
    started_at = asyncio.get_running_loop().time()
    cases_list = default_cases() + (deep_cases() if DEEP else [])
    if only := os.environ.get("GATEWAY_DIFFERENTIAL_CASES"):
        cases_list = [case for case in cases_list if only in case.name]
    cases = {f"d{index:05d}": case for index, case in enumerate(cases_list)}
    token = tokens.good(USER)
    commands = {name: await asyncio.to_thread(command_or_reason, name) for name in STACKS}
    runs: dict[str, Run | str] = {n: c for n, c in commands.items() if isinstance(c, str)}

    async def one(name: str, command: list[str]) -> None:
        async with started(name, command, ROUTES) as stack:

            def edit(config: dict[str, Any]) -> None:
                config["upstream"] = {"url": stack.url, "timeout_seconds": 5}
                config["token"] = [{"header": "Authorization", "scheme": "Bearer"}]
                config["failure_counter"] = {"threshold": 10**6}
                config["routes"] = gateway_routes()

            runs[name] = await run_stack(stack, lambda: make_gateway(edit), cases, token)

    async with asyncio.TaskGroup() as group:
        for name, command in commands.items():
            if not isinstance(command, str):
                group.create_task(one(name, command))
    seconds = asyncio.get_running_loop().time() - started_at
    return Corpus(cases, runs, seconds)


# --- the property ---------------------------------------------------------------------------------


def values_read(record: dict[str, Any]) -> list[Any]:
    readings: dict[str, list[Any]] = record.get("readings") or {}
    return [value for values in readings.values() for value in values if value is not None]


def problem_with(record: dict[str, Any], run: Run) -> str | None:
    """Why this record breaks the property, or None."""
    rid = str(record.get("request_id"))
    verdict = run.verdicts.get(rid)
    if verdict is None or verdict.decision not in FORWARDED:
        return f"processed request {rid!r}, which the gateway never forwarded"
    status = record.get("auth_status")
    if status != verdict.decision:
        return f"read X-Auth-Status {status!r} where the gateway forwarded {verdict.decision!r}"
    if status == "verified" and record.get("authenticated_user") != USER:
        return f"read X-Authenticated-User {record.get('authenticated_user')!r}"
    if status == "verified" and (others := [v for v in values_read(record) if v != USER]):
        return f"read user {others!r} from a request verified for {USER!r}"
    if status == "anonymous" and (others := values_read(record)):
        return f"read user {others!r} from an anonymous request"
    return None


def control_problem(case: Case, verdict: Verdict, records: list[dict[str, Any]]) -> str | None:
    """The corpus's controls must be forwarded and read by every stack, or the stack is not
    reading at all and proves nothing."""
    expect = case.extra.get("expect")
    if expect is None:
        return None
    if verdict.decision != expect:
        return f"control case not forwarded as {expect}: {verdict}"
    if expect == "verified" and not any(USER in values_read(r) for r in records):
        return f"control case: read no {USER!r}, so this stack reads nothing"
    return None


def describe_reading(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no request reached it"
    parts = []
    for record in records:
        readings = record.get("readings") or {}
        read = ", ".join(f"{place} = {values!r}" for place, values in readings.items())
        text = (
            f"[{record.get('request_id')}] {record.get('auth_status')!r} "
            f"{record.get('authenticated_user')!r}; {read or 'read nothing'}"
        )
        if record.get("note"):
            text += f" ({record['note']})"
        parts.append(text)
    return " | ".join(parts)


def report(corpus: Corpus, stack: str, problems: dict[str, list[str]]) -> str:
    lines = [f"{len(problems)} of {len(corpus.cases)} requests read otherwise by {stack}:"]
    for rid, found in problems.items():
        case = corpus.cases[rid]
        first = corpus.runs[stack]
        assert isinstance(first, Run)
        lines.append(f"- {case.name}")
        lines.append(f"    request: {case.describe()}")
        lines.append(f"    gateway: {first.verdicts[rid]}")
        for name in STACKS:
            run = corpus.runs.get(name)
            if not isinstance(run, Run):
                continue
            mark = "  X " if name == stack else "    "
            lines.append(f"  {mark}{name}: {describe_reading(run.records.get(rid, []))}")
        lines += [f"    -> {stack} {text}" for text in found]
    return "\n".join(lines)


def summary(corpus: Corpus) -> str:
    run = next(run for run in corpus.runs.values() if isinstance(run, Run))
    forwarded = sum(verdict.decision in FORWARDED for verdict in run.verdicts.values())
    seconds = ", ".join(
        f"{name} {run.seconds:.1f} s" for name, run in corpus.runs.items() if isinstance(run, Run)
    )
    return (
        f"{len(corpus.cases)} requests per stack, {forwarded} forwarded and "
        f"{len(corpus.cases) - forwarded} refused by the gateway; "
        f"{corpus.seconds:.1f} s in all ({seconds})"
    )


@pytest.mark.timeout(600 if DEEP else 180)
@pytest.mark.parametrize("stack", list(STACKS))
async def test_upstream_reads_no_one_but_the_user_the_gateway_authorised(
    stack: str, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    if not _corpus:
        _corpus.append(await run_corpus(make_gateway, tokens))
    corpus = _corpus[0]
    run = corpus.runs[stack]
    if isinstance(run, str):
        pytest.skip(f"{stack} cannot be had here: {run}")
    problems: dict[str, list[str]] = defaultdict(list)
    for rid, case in corpus.cases.items():
        records = run.records.get(rid, [])
        for record in records:
            if (problem := problem_with(record, run)) is not None:
                problems[rid].append(problem)
        if (problem := control_problem(case, run.verdicts[rid], records)) is not None:
            problems[rid].append(problem)
    strays = [r for rid in run.records.keys() - corpus.cases.keys() for r in run.records[rid]]
    message = report(corpus, stack, dict(problems)) if problems else ""
    if strays:
        message += f"\n{stack} processed requests no case sent: {describe_reading(strays)}"
    if message:
        pytest.fail(message + "\n" + summary(corpus), pytrace=False)
