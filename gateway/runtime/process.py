"""One serving process: the public listener, the admin listener, signals, reload and drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.auth.jwks import JwksRefresher
from gateway.auth.verify import TokenCache
from gateway.base.clock import Clock
from gateway.base.tasks import spawn
from gateway.config.compiled import CompiledConfig, load_and_compile
from gateway.config.routes import DEFAULT_UPSTREAM
from gateway.config.settings import ConfigError, Problem, Settings
from gateway.counters import FailureCounter
from gateway.counters.memory import MemoryFailureCounter
from gateway.counters.redis import RedisFailureCounter
from gateway.forwarding.upstream import Upstream
from gateway.http.outbox import Outbox
from gateway.http.server import HttpServer
from gateway.http.sockets import bind
from gateway.pipeline import Pipeline
from gateway.runtime.admin import make_admin_app
from gateway.telemetry.logs import AccessLog
from gateway.telemetry.metrics import FLUSH_SECONDS, Metrics
from gateway.telemetry.tracing import Tracing

log = logging.getLogger("gateway")

# Changing these needs a restart: they own sockets, processes or the counter's state.
RESTART_ONLY = ("listen", "admin_listen", "workers", "failure_counter.backend", "tracing")


def _setting(settings: Settings, dotted: str) -> object:
    value: object = settings
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def load_config(path: Path, clock: Clock, cache: TokenCache | None = None) -> CompiledConfig:
    return load_and_compile(path, clock, cache)


def make_counter(config: CompiledConfig, clock: Clock, metrics: Metrics) -> FailureCounter:
    settings = config.settings.failure_counter
    if settings.backend == "redis":
        return RedisFailureCounter(
            url=settings.redis_url,
            cluster=settings.redis_cluster,
            timeout_ms=settings.redis_timeout_ms,
            ttl_seconds=settings.session_ttl_seconds,
            on_error=metrics.counter_errors.labels("redis").inc,
        )
    return MemoryFailureCounter(
        ttl_seconds=settings.session_ttl_seconds, max_sessions=settings.max_sessions, clock=clock
    )


def make_upstreams(
    config: CompiledConfig, outbox: Outbox, keep: dict[str, Upstream] | None = None
) -> dict[str, Upstream]:
    """A pooled client for each upstream the config names. From `keep`, those whose settings
    are unchanged and that are plain http:// (an https:// one is made afresh: its CA or client
    certificate may have been rotated)."""
    settings = config.settings
    wanted = {DEFAULT_UPSTREAM: settings.upstream, **settings.upstreams}
    upstreams = {}
    for name, upstream_settings in wanted.items():
        kept = (keep or {}).get(name)
        if kept is not None and kept.settings == upstream_settings and not kept.tls:
            upstreams[name] = kept
        else:
            tls = config.upstream_tls[name]
            upstreams[name] = Upstream(name, upstream_settings, tls, outbox)
    return upstreams


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    digest: str
    problems: tuple[Problem, ...]


class GatewayServer:
    """Serves one compiled config until stopped; reloads swap the config atomically."""

    def __init__(
        self,
        config: CompiledConfig,
        *,
        clock: Clock | None = None,
        access_log: AccessLog | None = None,
        public_socket: socket.socket | None = None,
        admin_socket: socket.socket | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.outbox = Outbox(asyncio.get_running_loop())
        self.metrics = Metrics()
        config.token_cache.observe(self.metrics.cache_hit.inc, self.metrics.cache_miss.inc)
        enabled = config.settings.access_log.enabled
        self.jwks = JwksRefresher(self._jwks_fetched)
        tracing = config.settings.tracing
        self.tracing = Tracing(tracing) if tracing is not None else None
        self.pipeline = Pipeline(
            config,
            clock=self.clock,
            counter=make_counter(config, self.clock, self.metrics),
            upstreams=make_upstreams(config, self.outbox),
            access_log=access_log or AccessLog(enabled=enabled),
            metrics=self.metrics,
            jwks=self.jwks,
            tracing=self.tracing,
        )
        self.pipeline.access_log.observe(self.metrics.access_log_dropped.inc)
        self.draining = False
        self._retired: list[Upstream | FailureCounter] = []  # replaced by a reload, closing soon
        self._public_socket = public_socket
        self._admin_socket = admin_socket
        self._public: HttpServer | None = None
        self._admin: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    def _jwks_fetched(self, label: str, ok: bool) -> None:
        self.metrics.jwks_fetches.labels(label, "success" if ok else "failure").inc()
        if ok:
            project = self.config.projects.get(label.lower(), self.config.other_projects)
            self.metrics.keys_loaded.labels(label).set(len(project.keys.all_keys))

    @property
    def ready(self) -> bool:
        return not self.draining and self.jwks.ready

    @property
    def config(self) -> CompiledConfig:
        return self.pipeline.config

    @property
    def public_port(self) -> int:
        assert self._public_socket is not None
        port: int = self._public_socket.getsockname()[1]
        return port

    @property
    def admin_port(self) -> int:
        assert self._admin_socket is not None
        port: int = self._admin_socket.getsockname()[1]
        return port

    async def start(self) -> None:
        settings = self.config.settings
        if self._public_socket is None:
            self._public_socket = bind(settings.listen)
        if self._admin_socket is None:
            self._admin_socket = bind(settings.admin_listen)
        self.pipeline.access_log.start()
        self._flusher = spawn(self._flush_metrics())
        self._public = HttpServer(
            self.pipeline, asyncio.get_running_loop(), self.outbox, self.metrics
        )
        await self._public.start(self._public_socket, self.config.listener_tls)
        self._admin = web.AppRunner(make_admin_app(self), access_log=None)
        await self._admin.setup()
        await web.SockSite(self._admin, self._admin_socket).start()
        log.info(
            "serving",
            extra={
                "fields": {
                    "listen": settings.listen,
                    "public_port": self.public_port,
                    "admin_port": self.admin_port,
                    "config_digest": self.config.digest,
                    "projects": {
                        p: {"mode": s.mode, "keys": dict(self.config.key_fingerprints[p])}
                        for p, s in settings.projects.items()
                    },
                }
            },
        )

    async def _flush_metrics(self) -> None:
        """For `workers: N`: the supervisor reads each worker's children, not its recorders."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.metrics.flush()

    async def reload(self) -> ReloadResult:
        """Load, validate and swap in the config file again; the running one keeps serving on
        any problem. Requests under way finish on the config they started with."""
        current = self.config
        try:
            candidate = load_config(current.source, self.clock, current.token_cache)
            problems = [
                Problem(name, "changes only on restart")
                for name in RESTART_ONLY
                if _setting(candidate.settings, name) != _setting(current.settings, name)
            ]
            if (candidate.settings.tls is None) != (current.settings.tls is None):
                problems.append(Problem("tls", "turning HTTPS on or off needs a restart"))
        except ConfigError as exc:
            problems = exc.problems
        if problems:
            self.metrics.config_reloads.labels("failure").inc()
            for problem in problems:
                log.error("reload refused", extra={"fields": {"problem": str(problem)}})
            return ReloadResult(False, current.digest, tuple(problems))
        if candidate.token_cache is not current.token_cache:  # its size changed
            candidate.token_cache.observe(self.metrics.cache_hit.inc, self.metrics.cache_miss.inc)
        upstreams = self._swap_clients(current.settings, candidate)
        self.pipeline.apply(candidate, upstreams)
        if self._public is not None:
            self._public.tls = candidate.listener_tls  # certificates read afresh: rotation
        logging.getLogger().setLevel(candidate.settings.log_level.upper())
        self.metrics.config_reloads.labels("success").inc()
        log.info("config reloaded", extra={"fields": {"config_digest": candidate.digest}})
        return ReloadResult(True, candidate.digest, ())

    def _swap_clients(self, old: Settings, candidate: CompiledConfig) -> dict[str, Upstream]:
        """The upstreams for `candidate` (new pools where their settings changed) and a new
        failure counter if its settings did; the old ones close once the requests that hold
        them can have finished."""
        current = self.pipeline.serving.upstreams
        upstreams = make_upstreams(candidate, self.outbox, current)
        retired: list[Upstream | FailureCounter] = [
            u for u in current.values() if u not in upstreams.values()
        ]
        new = candidate.settings
        counter_settings = new.failure_counter.model_copy(update={"threshold": 0})
        if counter_settings != old.failure_counter.model_copy(update={"threshold": 0}):
            retired.append(self.pipeline.counter)
            self.pipeline.counter = make_counter(candidate, self.clock, self.metrics)
        if retired:
            self._retired.extend(retired)
            longest = max(u.timeout_seconds for u in (old.upstream, *old.upstreams.values()))
            spawn(self._close_retired(retired, delay=longest + 1))
        return upstreams

    async def _close_retired(
        self, clients: list[Upstream | FailureCounter], *, delay: float = 0
    ) -> None:
        await asyncio.sleep(delay)
        for client in clients:
            if client in self._retired:
                self._retired.remove(client)
                await client.close()

    async def drain_and_stop(self) -> None:
        """SIGTERM: unready, keep serving for the drain delay, close the listener, let in-flight
        requests finish within the grace period."""
        if self.draining:
            return
        self.draining = True
        shutdown = self.config.settings.shutdown
        log.info(
            "draining", extra={"fields": {"drain_delay_seconds": shutdown.drain_delay_seconds}}
        )
        await asyncio.sleep(shutdown.drain_delay_seconds)
        await self.stop()

    async def stop(self) -> None:
        self.draining = True
        if self._public is not None:
            self.pipeline.stopping = True
            await self._public.close(self.config.settings.shutdown.grace_seconds)
            self._public = None
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        await self._close_retired(list(self._retired))
        for upstream in self.pipeline.serving.upstreams.values():
            await upstream.close()
        await self.pipeline.counter.close()
        await self.pipeline.access_log.close()
        await self.jwks.close()
        if self.tracing is not None:  # what is still waiting goes out, within its timeout
            await asyncio.to_thread(self.tracing.shutdown)
        if self._flusher is not None:
            self._flusher.cancel()
        self.metrics.flush()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: spawn(self.drain_and_stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: spawn(self.reload()))


async def serve(path: Path) -> None:
    server = GatewayServer(load_config(path, Clock()))
    for warning in server.config.warnings:
        log.warning("config warning", extra={"fields": {"warning": str(warning)}})
    await server.start()
    server.install_signal_handlers()
    with contextlib.suppress(asyncio.CancelledError):
        await server.wait_stopped()
