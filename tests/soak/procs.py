"""The soak's processes (gateway, tracking API, redis-server) and what /proc says about them.

Every process starts in its own session, so a Ctrl-C at the terminal reaches only the runner,
which then stops them itself (SIGTERM, then SIGKILL) in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPOSITORY = Path(__file__).resolve().parents[2]
POLL_SECONDS = 0.05
STOP_SECONDS = 10.0


class SoakError(Exception):
    """A problem that ends the soak run, meant for the person running it."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@dataclass
class Service:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, sig: int = signal.SIGTERM, seconds: float = STOP_SECONDS) -> int:
        """Signal the process and wait for it; SIGKILL past `seconds`. Its exit status."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                async with asyncio.timeout(seconds):
                    return await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        return await self.process.wait()


class Services:
    """Everything the soak started, stopped in reverse order however the run ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Service] = []

    async def start(self, name: str, argv: Sequence[str], *, stdout_to_log: bool = True) -> Service:
        """`argv` from the repository root (so `python -m tests.soak...` imports), its stderr
        (and stdout, unless `stdout_to_log` is False) in `<name>.log` beside the config."""
        log = self.directory / f"{name}.log"
        with log.open("wb") as handle:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=handle if stdout_to_log else asyncio.subprocess.DEVNULL,
                stderr=handle,
                start_new_session=True,
                cwd=REPOSITORY,
            )
        service = Service(name, process, log)
        self.started.append(service)
        return service

    async def stop_all(self) -> None:
        for service in reversed(self.started):
            await service.stop()
        self.started.clear()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, service: Service, seconds: float = 20
) -> None:
    """Poll `check` until true; fail early if `service` exited, or at the deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if service.process.returncode is not None:
            raise SoakError(
                f"{service.name} exited ({service.process.returncode}) before {what}:\n"
                f"{service.log_tail()}"
            )
        with contextlib.suppress(aiohttp.ClientError, OSError):
            if await check():
                return
        await asyncio.sleep(POLL_SECONDS)
    raise SoakError(f"timed out waiting for {what}:\n{service.log_tail()}")


async def http_ok(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(url) as response:
        await response.read()
        return response.status == 200


async def redis_pong(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        await writer.drain()
        return (await reader.readline()).startswith(b"+PONG")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# --- /proc ------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SoakError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True, slots=True)
class Fds:
    """A process's open file descriptors, its TCP sockets sorted by what they connect to."""

    total: int
    clients: int  # accepted connections on the public or admin listener
    upstream: int  # connections to the tracking API
    redis: int
    listeners: int
    other_sockets: int

    @property
    def fixed(self) -> int:
        """Everything but connections, which come and go with the traffic."""
        return self.total - self.clients - self.upstream - self.redis


def _tcp_sockets(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) for the process's network namespace."""
    found: dict[int, tuple[int, int, str]] = {}
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                found[inode] = (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    state,
                )
    return found


def fds(pid: int, *, serving: set[int], upstream: int, redis: int | None) -> Fds:
    links = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            links.append(os.readlink(entry))
    sockets = _tcp_sockets(pid)
    clients = upstreams = redis_links = listeners = other = 0
    for link in links:
        if not link.startswith("socket:["):
            continue
        known = sockets.get(int(link[8:-1]))
        if known is None:
            other += 1  # unix sockets, socketpairs, or a TCP socket already gone
            continue
        local, remote, state = known
        if state == "0A":
            listeners += 1
        elif local in serving:
            clients += 1
        elif remote == upstream:
            upstreams += 1
        elif redis is not None and remote == redis:
            redis_links += 1
        else:
            other += 1
    return Fds(len(links), clients, upstreams, redis_links, listeners, other)
