"""The admin listener: health, readiness and reload; never on the public port."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.config.compiled import CompiledConfig
from gateway.config.settings import Problem
from gateway.telemetry.metrics import Metrics


class ReloadOutcome(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def digest(self) -> str: ...

    @property
    def problems(self) -> tuple[Problem, ...]: ...


class Served(Protocol):
    """What the admin listener reads of, and asks of, the process it belongs to."""

    @property
    def draining(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    @property
    def config(self) -> CompiledConfig: ...

    @property
    def metrics(self) -> Metrics: ...

    async def reload(self) -> ReloadOutcome: ...


SERVER_KEY: web.AppKey[Served] = web.AppKey("server")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    if server.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not server.ready:
        return web.json_response({"status": "waiting for JWKS keys"}, status=503)
    return web.json_response({"status": "ready", "config_digest": server.config.digest})


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[SERVER_KEY].metrics
    metrics.flush()
    registry = metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def reload(request: web.Request) -> web.Response:
    result = await request.app[SERVER_KEY].reload()
    if result.ok:
        return web.json_response({"status": "reloaded", "config_digest": result.digest})
    return web.json_response(
        {
            "status": "refused",
            "config_digest": result.digest,
            "problems": [str(p) for p in result.problems],
        },
        status=422,
    )


def make_admin_app(server: Served) -> web.Application:
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/-/reload", reload)
    return app
