"""A small tracking API for `make run`, `gateway demo` and the tests: it accepts every request,
answers `{"success": true}` and keeps what it received, so you can see what the gateway
forwarded (GET /_sample/requests)."""

from __future__ import annotations

import json
import sys
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from aiohttp import web

from gateway.http.sockets import bind


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: str


RECORDS_KEY: web.AppKey[deque[Received]] = web.AppKey("records", deque)


async def _track(request: web.Request) -> web.Response:
    body = await request.read()
    record = Received(
        request.method,
        request.raw_path,
        [(k, v) for k, v in request.headers.items()],
        body.decode("utf-8", "replace"),
    )
    request.app[RECORDS_KEY].append(record)
    if request.app.get(ECHO_KEY):
        auth = request.headers.get("X-Auth-Status")
        user = request.headers.get("X-Authenticated-User")
        print(f"sample upstream: {request.method} {request.path} auth={auth} user={user}")
        sys.stdout.flush()
    return web.json_response({"success": True}, dumps=_dumps_line)


def _dumps_line(value: object) -> str:
    """JSON ending in a newline, so a terminal shows curl's prompt on a line of its own."""
    return json.dumps(value) + "\n"


async def _recorded(request: web.Request) -> web.Response:
    return web.json_response([asdict(r) for r in request.app[RECORDS_KEY]], dumps=_dumps_line)


ECHO_KEY: web.AppKey[bool] = web.AppKey("echo", bool)


def make_sample_upstream(*, keep: int = 1000, echo: bool = False) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECORDS_KEY] = deque(maxlen=keep)
    app[ECHO_KEY] = echo
    app.router.add_get("/_sample/requests", _recorded)
    app.router.add_route("*", "/{tail:.*}", _track)
    return app


def run_sample_upstream(listen: str, ready_file: Path | None = None) -> None:
    sock = bind(listen)  # a busy port is a one-line error, not a traceback
    print(json.dumps({"sample_upstream": f"http://{listen}"}), flush=True)
    if ready_file is not None:
        ready_file.write_text(f"{listen}\n")
    web.run_app(make_sample_upstream(echo=True), sock=sock, print=None)
