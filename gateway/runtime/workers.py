"""`workers: N`: N serving processes sharing one listening socket under one supervising parent.

The parent binds the public socket once (exclusively: a second gateway on the same address
fails to start) and every worker inherits it. The parent validates the config once, owns the
admin listener (metrics of every worker summed
through prometheus-client's multiprocess files, readiness of every worker, reload), forwards
signals, and replaces a worker that dies. Each worker is an ordinary single-process gateway
whose admin listener is on an ephemeral loopback port only the parent uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.base.clock import Clock
from gateway.base.tasks import spawn
from gateway.config.compiled import CompiledConfig
from gateway.config.settings import ConfigError
from gateway.http.sockets import LISTEN_FD_ENV, bind, inherited_listener
from gateway.runtime.admin import AdminHandler, config_answer, guarded
from gateway.runtime.process import GatewayServer, load_config

log = logging.getLogger("gateway.workers")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_BACKOFF_SECONDS = 1.0
# The directory the running `gateway` package was imported from (gateway/runtime/workers.py).
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class Worker:
    index: int
    port_file: Path
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0

    def admin_port(self) -> int | None:
        try:
            return int(self.port_file.read_text())
        except (OSError, ValueError):
            return None


@dataclass
class Supervisor:
    path: Path
    count: int
    runtime: Path
    config: CompiledConfig
    listener: socket.socket
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False
    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})

    @property
    def metrics_dir(self) -> Path:
        return self.runtime / "metrics"

    async def start_worker(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            worker.port_file.unlink()
        fd = self.listener.fileno()
        env = {**os.environ, METRICS_DIR_ENV: str(self.metrics_dir), LISTEN_FD_ENV: str(fd)}
        # A worker runs the package this process runs (the compiled build or the sources),
        # whatever the working directory holds: `-P` leaves the working directory off its path,
        # and the directory this package was imported from goes first.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "gateway",
            "worker",
            "-c",
            str(self.path),
            "--admin-port-file",
            str(worker.port_file),
            env=env,
            pass_fds=(fd,),
        )
        worker.started = time.monotonic()
        log.info(
            "worker started", extra={"fields": {"worker": worker.index, "pid": worker.process.pid}}
        )

    async def supervise(self, worker: Worker) -> None:
        """Replace the worker whenever it dies, until the gateway stops."""
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            _mark_dead(worker.process.pid, self.metrics_dir)
            if self.stopping:
                return
            log.error(
                "worker died; replacing it",
                extra={"fields": {"worker": worker.index, "exit_code": code}},
            )
            wait = RESTART_BACKOFF_SECONDS - (time.monotonic() - worker.started)
            if wait > 0:
                await asyncio.sleep(wait)
            await self.start_worker(worker)

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    def reload(self) -> tuple[bool, str, list[str]]:
        """Validate once; if good, every worker reloads the same file."""
        try:
            candidate = load_config(self.path, Clock())
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
        else:
            problems = []
        if problems:
            self.reloads["failure"] += 1
            for problem in problems:
                log.error("reload refused", extra={"fields": {"problem": problem}})
            return False, self.config.digest, problems
        self.config = candidate
        self.signal_workers(signal.SIGHUP)
        self.reloads["success"] += 1
        return True, candidate.digest, []

    async def workers_ready(self, session: aiohttp.ClientSession) -> bool:
        for worker in self.workers:
            port = worker.admin_port()
            if port is None or worker.process is None or worker.process.returncode is not None:
                return False
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status != 200:
                        return False
            except aiohttp.ClientError:
                return False
        return True


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """Drop a dead worker's live gauges (in-flight requests) from the sums."""
    with contextlib.suppress(OSError, KeyError):
        mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


class _WorkersCollector:
    """Every worker's metrics summed, except reloads: the parent validates and counts those
    once, where each worker would count the same reload again."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        # prometheus-client's multiprocess module carries no annotations.
        self._workers = MultiProcessCollector(None, path=str(supervisor.metrics_dir))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        for family in self._workers.collect():  # type: ignore[no-untyped-call]
            if family.name != "gateway_config_reloads":
                yield family
        reloads = CounterMetricFamily(
            "gateway_config_reloads", "Config reloads, by result.", labels=["result"]
        )
        for result, count in self._supervisor.reloads.items():
            reloads.add_metric([result], count)
        yield reloads


def _admin_app(supervisor: Supervisor, session: aiohttp.ClientSession) -> web.Application:
    registry = CollectorRegistry()
    registry.register(_WorkersCollector(supervisor))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": supervisor.count})

    async def readyz(request: web.Request) -> web.Response:
        if supervisor.stopping:
            return web.json_response({"status": "draining"}, status=503)
        if not await supervisor.workers_ready(session):
            return web.json_response({"status": "workers not ready"}, status=503)
        return web.json_response({"status": "ready", "config_digest": supervisor.config.digest})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def reload(request: web.Request) -> web.Response:
        ok, digest, problems = supervisor.reload()
        status = 200 if ok else 422
        body: dict[str, object] = {
            "status": "reloaded" if ok else "refused",
            "config_digest": digest,
        }
        if problems:
            body["problems"] = problems
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    _add_guarded(app, supervisor, reload)
    return app


def _add_guarded(app: web.Application, supervisor: Supervisor, reload: AdminHandler) -> None:
    """Reload and the running config, behind the running config's `admin_token`."""

    async def running_config(request: web.Request) -> web.Response:
        return config_answer(supervisor.config)

    def token() -> str | None:
        return supervisor.config.settings.admin_token

    app.router.add_post("/-/reload", guarded(reload, token))
    app.router.add_get("/-/config", guarded(running_config, token))


async def supervise(path: Path, count: int) -> int:
    runtime = Path(tempfile.mkdtemp(prefix="gateway-workers-"))
    try:
        config = load_config(path, Clock())
        # Both addresses are taken before any worker starts: a busy one stops everything.
        supervisor = Supervisor(path, count, runtime, config, bind(config.settings.listen))
        admin_socket = bind(config.settings.admin_listen)
        supervisor.metrics_dir.mkdir()
        supervisor.workers = [Worker(i, runtime / f"worker-{i}.port") for i in range(count)]
        for worker in supervisor.workers:
            await supervisor.start_worker(worker)
        watchers = [spawn(supervisor.supervise(w)) for w in supervisor.workers]
        stopped = _stop_on_signals(supervisor)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            admin = web.AppRunner(_admin_app(supervisor, session), access_log=None)
            await admin.setup()
            await web.SockSite(admin, admin_socket).start()
            log.info(
                "supervising",
                extra={"fields": {"workers": count, "listen": config.settings.listen}},
            )
            await stopped.wait()
            await _workers_stopped(supervisor)
            for watcher in watchers:
                watcher.cancel()
            await admin.cleanup()
        return 0
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _stop_on_signals(supervisor: Supervisor) -> asyncio.Event:
    """SIGTERM and SIGINT drain every worker (the event is set), SIGHUP reloads them all."""
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        supervisor.stopping = True
        supervisor.signal_workers(signal.SIGTERM)
        stopped.set()

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    return stopped


async def _workers_stopped(supervisor: Supervisor) -> None:
    """Waits for the draining workers; those still running past drain and grace are killed."""
    shutdown = supervisor.config.settings.shutdown
    deadline = shutdown.drain_delay_seconds + shutdown.grace_seconds + 5
    processes = [w.process for w in supervisor.workers if w.process is not None]
    try:
        async with asyncio.timeout(deadline):
            await asyncio.gather(*(p.wait() for p in processes))
    except TimeoutError:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()


def _exit_with_parent() -> None:
    """A worker whose supervisor died (even by SIGKILL) gets SIGTERM and drains, rather than
    keep serving the shared port with a config nobody can reload."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def serve_worker(path: Path, admin_port_file: Path) -> None:
    """One worker: the ordinary server, its admin listener on a loopback port for the parent."""
    _exit_with_parent()
    config = load_config(path, Clock())
    logging.getLogger().setLevel(config.settings.log_level.upper())
    server = GatewayServer(
        config, public_socket=inherited_listener(), admin_socket=bind("127.0.0.1:0")
    )
    await server.start()
    await asyncio.to_thread(admin_port_file.write_text, str(server.admin_port))
    server.install_signal_handlers()
    await server.wait_stopped()
