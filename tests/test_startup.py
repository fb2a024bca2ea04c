"""Start-up as an operator meets it: `gateway` as a real subprocess. A busy address, a missing
file or a bad config is one line on stderr naming what failed, a non-zero exit, no traceback;
two gateways never share a port by accident, and workers share the one socket their
supervisor bound."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    KeyPair,
    Upstream,
    base_config,
    children_of,
    free_port,
    gateway_process,
    write_config,
)

EVENTS = "/track/v2/projects/app/customers/events"


async def run_to_exit(*args: str, seconds: float = 30) -> tuple[int, str]:
    """Run `gateway ARGS` until it exits; its exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(seconds):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


def assert_one_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [expected], stderr


def gateway_config(
    tmp_path: Path, key_a: KeyPair, upstream_url: str, **overrides: Any
) -> tuple[Path, dict[str, Any]]:
    config = base_config(upstream_url)
    config.update(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}")
    config.update(overrides)
    return write_config(tmp_path, config, {"a.pem": key_a}), config


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
@pytest.mark.parametrize("workers", [1, 2])
async def test_a_busy_address_is_one_line_and_a_non_zero_exit(
    tmp_path: Path, key_a: KeyPair, upstream: Upstream, busy_address: str, which: str, workers: int
) -> None:
    path, _ = gateway_config(
        tmp_path, key_a, upstream.url, workers=workers, **{which: busy_address}
    )
    code, stderr = await run_to_exit("run", "-c", str(path))
    assert code == 1
    assert_one_line(stderr, f"gateway: cannot listen on {busy_address}: Address already in use")


async def test_a_second_gateway_on_a_busy_port_exits_and_the_first_keeps_all_traffic(
    tmp_path: Path, key_a: KeyPair, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """The mistake this prevents: a `monitor` gateway started on a `required` one's port
    answering half its traffic, with no error anywhere."""
    path, config = gateway_config(tmp_path, key_a, upstream.url)
    async with gateway_process(path, config["admin_listen"], what="the first gateway"):
        monitor = dict(config)
        monitor["admin_listen"] = f"127.0.0.1:{free_port()}"
        monitor["projects"] = {"app": {**config["projects"]["app"], "mode": "monitor"}}
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = write_config(second_dir, monitor, {"a.pem": key_a})
        code, stderr = await run_to_exit("run", "-c", str(second))
        assert code == 1
        assert_one_line(
            stderr, f"gateway: cannot listen on {config['listen']}: Address already in use"
        )
        # Every identified request without a token is refused: none reached a monitor.
        body = json.dumps({"customer_ids": {"registered": "alice"}})
        for _ in range(20):
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                url = f"http://{config['listen']}{EVENTS}"
                async with fresh.post(url, data=body) as response:
                    # 401, then 429 once the client address is past the failure threshold
                    assert response.status in (401, 429)
        assert upstream.received == []


async def test_workers_share_the_supervisors_one_socket(
    tmp_path: Path, key_a: KeyPair, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    path, config = gateway_config(tmp_path, key_a, upstream.url, workers=2)
    async with gateway_process(path, config["admin_listen"], what="both workers") as process:
        workers = children_of(process.pid)
        assert len(workers) == 2
        port = int(config["listen"].rpartition(":")[2])
        inodes = {pid: listening_inodes(pid, port) for pid in (process.pid, *workers)}
        # One socket (one inode) for all three processes: inherited, not bound again.
        assert len(set().union(*inodes.values())) == 1, inodes
        assert all(inodes.values()), inodes


def listening_inodes(pid: int, port: int) -> set[str]:
    """The inodes of the TCP sockets listening on `port` that process `pid` holds."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
            listening.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[8:-1])
    return listening & held


async def test_a_missing_or_broken_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    code, stderr = await run_to_exit("run", "-c", str(missing))
    assert code == 1
    assert_one_line(stderr, f"gateway: config {missing}: No such file or directory")
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen: [\n")
    code, stderr = await run_to_exit("run", "-c", str(broken))
    assert code == 1
    assert_one_line(
        stderr,
        f"gateway: config {broken}: invalid YAML at line 2, column 1: "
        "expected the node content, but found '<stream end>'",
    )


async def test_the_sample_upstream_on_a_busy_port_is_one_line(busy_address: str) -> None:
    code, stderr = await run_to_exit("sample-upstream", "--listen", busy_address)
    assert code == 1
    assert_one_line(stderr, f"gateway: cannot listen on {busy_address}: Address already in use")


async def test_the_demo_on_a_busy_port_is_one_line(busy_address: str) -> None:
    port = busy_address.rpartition(":")[2]
    code, stderr = await run_to_exit("demo", "--upstream-port", port)
    assert code == 1
    assert_one_line(stderr, f"gateway: cannot listen on {busy_address}: Address already in use")
