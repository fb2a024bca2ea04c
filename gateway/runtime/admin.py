"""The admin listener: health, readiness, metrics, reload and the running config; never on the
public port. With `admin_token` set, reload and the config need it; probes and metrics stay
open for load balancers and scrapers."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.config.compiled import CompiledConfig
from gateway.config.settings import Problem
from gateway.config.view import redacted
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
AdminHandler = Callable[[web.Request], Awaitable[web.Response]]


def authorised(request: web.Request, token: str | None) -> bool:
    """No token configured, or `Authorization: Bearer <token>` (compared in constant time)."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def guarded(handler: AdminHandler, token: Callable[[], str | None]) -> AdminHandler:
    """`handler` behind the admin token of the config running when the request comes."""

    async def checked(request: web.Request) -> web.Response:
        if not authorised(request, token()):
            return web.json_response(
                {"status": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
            )
        return await handler(request)

    return checked


def config_answer(config: CompiledConfig) -> web.Response:
    return web.json_response({"config_digest": config.digest, "config": redacted(config.settings)})


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


async def running_config(request: web.Request) -> web.Response:
    return config_answer(request.app[SERVER_KEY].config)


def make_admin_app(server: Served) -> web.Application:
    app = web.Application()
    app[SERVER_KEY] = server

    def token() -> str | None:
        return server.config.settings.admin_token

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/-/reload", guarded(reload, token))
    app.router.add_get("/-/config", guarded(running_config, token))
    return app
