"""`workers: N` against the real processes: one port, summed metrics, reload of every worker, a
killed worker replaced, SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    KeyPair,
    Upstream,
    base_config,
    children_of,
    eventually,
    free_port,
    gateway_process,
    write_config,
)

EVENTS = "/track/v2/projects/app/customers/events"


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class Running:
    def __init__(self, process: asyncio.subprocess.Process, config: dict[str, Any], path: Path):
        self.process = process
        self.url = f"http://{config['listen']}"
        self.admin = f"http://{config['admin_listen']}"
        self.path = path


@pytest.fixture
async def two_workers(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair, upstream: Upstream
) -> AsyncIterator[Running]:
    config = base_config(upstream.url)
    config.update(
        listen=f"127.0.0.1:{free_port()}",
        admin_listen=f"127.0.0.1:{free_port()}",
        workers=2,
        shutdown={"drain_delay_seconds": 0, "grace_seconds": 5},
    )
    config["projects"]["app"]["mode"] = "monitor"
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    stderr = tmp_path / "stderr.log"
    # Started in a directory holding a `gateway` package that is not the gateway: workers that
    # imported it (rather than the package the supervisor runs) would never be ready.
    decoy = tmp_path / "decoy"
    (decoy / "gateway").mkdir(parents=True)
    (decoy / "gateway" / "__init__.py").write_text("")
    (decoy / "gateway" / "__main__.py").write_text("raise SystemExit('not the gateway')\n")
    async with gateway_process(
        path, config["admin_listen"], what="both workers ready", stderr=stderr, cwd=decoy
    ) as process:
        yield Running(process, config, path)


async def send(http: aiohttp.ClientSession, url: str, user: str = "alice") -> int:
    body = json.dumps({"customer_ids": {"registered": user}})
    headers = {"Content-Type": "application/json"}
    async with http.post(url + EVENTS, data=body, headers=headers) as response:
        return response.status


async def requests_total(http: aiohttp.ClientSession, admin: str) -> float:
    async with http.get(admin + "/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_requests_total"
    )


def test_workers_run_the_supervisors_package_whatever_their_directory_holds(
    two_workers: Running,
) -> None:
    workers = children_of(two_workers.process.pid)
    assert len(workers) == 2
    for pid in workers:  # ready, from a directory whose `gateway` package would exit at once
        assert (Path(f"/proc/{pid}/cwd").resolve() / "gateway" / "__main__.py").exists()


async def test_workers_share_the_port_and_sum_their_metrics(
    http: aiohttp.ClientSession, two_workers: Running
) -> None:
    assert len(children_of(two_workers.process.pid)) == 2
    # Separate connections, so the kernel spreads them over both workers.
    statuses = []
    for _ in range(40):
        async with aiohttp.ClientSession() as fresh:
            statuses.append(await send(fresh, two_workers.url))
    assert set(statuses) == {200}

    async def all_counted() -> bool:  # each worker adds its requests every FLUSH_SECONDS
        return await requests_total(http, two_workers.admin) == 40

    await eventually(all_counted, "the supervisor to sum 40 requests over both workers")


async def test_reload_reaches_every_worker(
    http: aiohttp.ClientSession, two_workers: Running
) -> None:
    config = yaml.safe_load(two_workers.path.read_text())
    config["projects"]["app"]["mode"] = "required"
    two_workers.path.write_text(yaml.safe_dump(config))
    async with http.post(two_workers.admin + "/-/reload") as response:
        assert response.status == 200

    async def all_required() -> bool:
        for attempt in range(20):
            async with aiohttp.ClientSession() as fresh:
                # A user each, so no session reaches the failure limit (429) meanwhile.
                if await send(fresh, two_workers.url, f"user-{attempt}") != 401:
                    return False
        return True

    await eventually(all_required, "every worker to enforce the reloaded mode")
    config["projects"]["app"]["mode"] = "bogus"
    two_workers.path.write_text(yaml.safe_dump(config))
    async with http.post(two_workers.admin + "/-/reload") as response:
        assert response.status == 422
        assert "projects.app.mode" in (await response.json())["problems"][0]
    async with http.get(two_workers.admin + "/metrics") as response:
        text = await response.text()
    assert 'gateway_config_reloads_total{result="success"} 1.0' in text
    assert 'gateway_config_reloads_total{result="failure"} 1.0' in text


async def test_a_killed_worker_is_replaced_and_sigterm_stops_all(
    http: aiohttp.ClientSession, two_workers: Running
) -> None:
    before = children_of(two_workers.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        now = children_of(two_workers.process.pid)
        return len(now) == 2 and victim not in now

    await eventually(replaced, "a new worker")

    async def ready() -> bool:
        async with http.get(two_workers.admin + "/readyz") as response:
            return response.status == 200

    await eventually(ready, "readiness after the replacement")
    assert await send(http, two_workers.url) == 200
    survivors = children_of(two_workers.process.pid)
    two_workers.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        assert await two_workers.process.wait() == 0
    assert not any(alive(pid) for pid in survivors)


async def test_workers_exit_when_the_supervisor_is_killed(two_workers: Running) -> None:
    workers = children_of(two_workers.process.pid)
    assert len(workers) == 2
    two_workers.process.kill()
    await two_workers.process.wait()

    async def gone() -> bool:
        return not any(alive(pid) for pid in workers)

    await eventually(gone, "orphaned workers to exit")
