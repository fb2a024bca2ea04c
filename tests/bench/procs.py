"""Child processes for the benchmark: binaries, free ports, CPU pinning, readiness, CPU time.

Every process starts in its own process group and is stopped (SIGTERM, then SIGKILL) by the
`Supervisor` that started it, in reverse order, however the run ends.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

POLL_SECONDS = 0.05
STOP_SECONDS = 5.0
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class BenchError(Exception):
    """A problem that ends the benchmark, with a message meant for the person running it."""


def find_binary(name: str) -> str | None:
    """`name` on PATH, or in the sbin directories a non-root PATH often lacks (nginx, haproxy)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=search)


def command_output(argv: Sequence[str]) -> str:
    """stdout and stderr of a short command (version banners go to either)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return (done.stdout + done.stderr).strip()


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1; all held open at once, so distinct."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# --- pinning -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pinning:
    """Command prefixes: the proxy under test on one core, load and upstream on another, and
    a `workers: N` gateway on every core but the load's (on two cores: on both, the load's
    shared)."""

    proxy: tuple[str, ...]
    load: tuple[str, ...]
    description: str
    proxy_core: int | None = None
    load_core: int | None = None
    workers: tuple[str, ...] = ()
    worker_cores: int = 1
    workers_share_load_core: bool = False


def choose_pinning() -> Pinning:
    cores = sorted(os.sched_getaffinity(0))
    taskset = find_binary("taskset")
    if len(cores) < 2:
        return Pinning((), (), f"not pinned: only {len(cores)} core available")
    if taskset is None:
        return Pinning((), (), "not pinned: taskset not found (Debian package util-linux)")
    proxy, load = cores[0], cores[1]
    worker_cores = [proxy, *cores[2:]] if len(cores) > 2 else [proxy, load]
    return Pinning(
        (taskset, "-c", str(proxy)),
        (taskset, "-c", str(load)),
        f"proxy under test on core {proxy}; wrk, upstream nginx and redis on core {load}",
        proxy,
        load,
        (taskset, "-c", ",".join(map(str, worker_cores))),
        len(worker_cores),
        load in worker_cores,
    )


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def check_running(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; its log:\n{self.log_tail()}")

    def cpu_pids(self) -> list[int]:
        """The process and its descendants (nginx works in its worker processes)."""
        return [self.pid, *descendants(self.pid)]


@dataclass
class Supervisor:
    workdir: Path
    services: list[Service] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout_to_log: bool = True,
        env: dict[str, str] | None = None,
    ) -> Service:
        """Start `argv` in a new process group; stderr (and stdout unless told) to a log file."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log if stdout_to_log else subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
                env=env,
            )
        service = Service(name, process, log_path)
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            stop_group(service.process)
        self.services.clear()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait, then SIGKILL what is left of it."""
    for sig, wait in ((signal.SIGTERM, STOP_SECONDS), (signal.SIGKILL, STOP_SECONDS)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure nothing it started (nginx workers) outlives it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        break


# --- readiness ---------------------------------------------------------------------------------


def wait_until(
    service: Service, what: str, check: Callable[[], bool], timeout: float = 20.0
) -> None:
    """Poll `check` until it holds; fail at the deadline or as soon as the service exits."""
    deadline = time.monotonic() + timeout
    while True:
        service.check_running()
        if check():
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{service.name}: {what} not within {timeout:.0f}s; its log:\n{service.log_tail()}"
            )
        time.sleep(POLL_SECONDS)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


def http_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
) -> Answer:
    connection = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
        if tls is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.read())
    finally:
        connection.close()


def answers_http(port: int, path: str, status: int = 200) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return http_request(port, "GET", path, timeout=1.0).status == status
        except OSError:
            return False

    return check


def accepts_tcp(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False

    return check


def answers_redis_ping(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    return check


# --- CPU time ----------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """User and system CPU time of these processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except (OSError, ValueError):
            continue  # gone
        user += int(fields[11])  # utime, stime: fields 14 and 15
        system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def descendants(ancestor: int) -> list[int]:
    """Every process below `ancestor` in the process tree, now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [ancestor]
    while frontier:
        below = children.get(frontier.pop(), [])
        found.extend(below)
        frontier.extend(below)
    return found


def core_ticks(core: int) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU core since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{core}":
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    raise BenchError(f"no cpu{core} line in /proc/stat")
