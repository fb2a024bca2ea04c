"""Real parts for every test: RSA keys, a recording upstream on port 0, the gateway on port 0.

Tokens are minted at test time from keys generated here; `tokens.good()` and friends are named
for what is wrong with them (Envoy's GoodToken / ExpiredToken / NonExistKidToken pattern).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import itertools
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
import pytest
import uvloop
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.base.clock import ManualClock
from gateway.config.compiled import compile_config
from gateway.config.settings import load_settings
from gateway.runtime.process import GatewayServer
from gateway.telemetry.logs import AccessLog
from gateway.tools.cli import installed_build
from gateway.tools.sample_upstream import RECORDS_KEY, Received, make_sample_upstream

# The request path is the compiled build's (`make test` runs part of the suite against it).
COMPILED = installed_build() == "compiled"
NOW = 1_900_000_000.0  # the tests' "now": a fixed instant, moved explicitly
T = TypeVar("T")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop `gateway run` uses: uvloop's transports differ from asyncio's in small ways."""
    return {"uvloop": uvloop.new_event_loop}


# --- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private: rsa.RSAPrivateKey

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )


@pytest.fixture(scope="session")
def key_a() -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def key_b() -> KeyPair:
    return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


# --- tokens ------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_raw(header: bytes, payload: bytes, key: KeyPair, alg: str = "RS256") -> str:
    """A token from exact header and payload bytes (for duplicate keys and other oddities)."""
    signing_input = f"{b64url(header)}.{b64url(payload)}".encode()
    hash_algorithm = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}
    signature = key.private.sign(signing_input, padding.PKCS1v15(), hash_algorithm[alg])
    return f"{signing_input.decode()}.{b64url(signature)}"


@dataclass
class Tokens:
    key: KeyPair
    clock: ManualClock
    kid: str = "key-a"

    def claims(self, user: str = "alice", ttl: float = 3600, **extra: Any) -> dict[str, Any]:
        now = self.clock.now()
        claims: dict[str, Any] = {
            "sub": {"key": "uid", "value": user},
            "iat": int(now),
            "exp": int(now + ttl),
        }
        claims.update(extra)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        claims: dict[str, Any],
        *,
        key: KeyPair | None = None,
        alg: str = "RS256",
        headers: dict[str, Any] | None = None,
    ) -> str:
        header: dict[str, Any] = {"kid": self.kid, "typ": "JWT"}
        header.update(headers or {})
        header = {k: v for k, v in header.items() if v is not None}
        return jwt.encode(claims, (key or self.key).private_pem, algorithm=alg, headers=header)

    def good(self, user: str = "alice", **extra: Any) -> str:
        return self.mint(self.claims(user, **extra))

    def expired(self, user: str = "alice") -> str:
        return self.mint(self.claims(user, ttl=-120))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def tokens(key_a: KeyPair, clock: ManualClock) -> Tokens:
    return Tokens(key_a, clock)


# --- the upstream ------------------------------------------------------------------------------


@dataclass
class Upstream:
    url: str
    port: int
    app: web.Application

    @property
    def received(self) -> list[Received]:
        records = self.app[RECORDS_KEY]
        return list(records)

    def last_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.received[-1].headers}


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    app = make_sample_upstream()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield Upstream(f"http://127.0.0.1:{port}", port, app)
    await runner.cleanup()


# --- the gateway -------------------------------------------------------------------------------


def base_config(upstream_url: str) -> dict[str, Any]:
    """The config most tests start from: project `app` in required mode with key `key-a`."""
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstream": {"url": upstream_url, "timeout_seconds": 5},
        "projects": {
            "app": {
                "mode": "required",
                "algorithms": ["RS256", "RS512"],
                "keys": [{"id": "key-a", "pem_file": "keys/a.pem"}],
            },
        },
        "identity": [{"json": "customer_ids.registered"}, {"header": "X-User-Id"}],
        "token": [
            {"header": "X-Sdk-Auth-Token"},
            {"header": "Authorization", "scheme": "Bearer"},
        ],
        "session": [{"header": "X-Session-Id"}],
        "routes": [
            {
                "name": "track-events",
                "methods": ["POST"],
                "path": "/track/v2/projects/{project}/customers/events",
                "auth": ["sdk_jwt"],
            },
            {
                "name": "track-batch",
                "methods": ["POST"],
                "path": "/track/v2/projects/{project}/batch",
                "auth": ["sdk_jwt"],
                "identity": [{"json": "commands[*].data.customer_ids.registered"}],
            },
            {
                "name": "sdk-config",
                "methods": ["GET"],
                "path": "/v2/sdkconfig",
                "project": {"header": "X-App-Id"},
                "auth": ["none"],
            },
        ],
    }


@dataclass
class RunningGateway:
    server: GatewayServer
    clock: ManualClock
    log_lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.public_port}"

    @property
    def port(self) -> int:
        return self.server.public_port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"

    async def access_log(self, count: int = 1, seconds: float = 5) -> list[dict[str, Any]]:
        """The access-log records once there are at least `count`: the log is flushed on a
        timer, so this flushes it and polls; fails at the deadline."""

        async def written() -> bool:
            self.server.pipeline.access_log.flush()
            return len(self.log_lines) >= count

        await eventually(written, f"{count} access-log records", seconds)
        return self.log_lines

    async def access_record(self, request_id: str, seconds: float = 5) -> dict[str, Any]:
        """The access-log record of `request_id` once it is written; fails unless there is
        exactly one."""

        def records() -> list[dict[str, Any]]:
            return [r for r in self.log_lines if r.get("request_id") == request_id]

        async def written() -> bool:
            self.server.pipeline.access_log.flush()
            return bool(records())

        await eventually(written, f"the access-log record of {request_id}", seconds)
        found = records()
        assert len(found) == 1, f"{len(found)} access-log records for {request_id}"
        return found[0]


def log_records(text: str, *, strict: bool = True) -> list[dict[str, Any]]:
    """The records of a JSON-lines log, in order: the access log (`gateway run`'s stdout, or
    what an in-process gateway writes) or the operational log (stderr). With `strict`, every
    non-empty line must be JSON; without, other lines are skipped: a traceback on stderr, or
    the last line of a log that is still being written."""
    if strict:
        return [json.loads(line) for line in text.splitlines() if line]
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


class _CapturedLog:
    def __init__(self, sink: list[dict[str, Any]]) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink.extend(log_records(data.decode()))
        return len(data)

    def flush(self) -> None:
        pass


def write_config(tmp_path: Path, config: dict[str, Any], keys: dict[str, KeyPair]) -> Path:
    (tmp_path / "keys").mkdir(exist_ok=True)
    for name, pair in keys.items():
        (tmp_path / "keys" / name).write_text(pair.public_pem)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def make_gateway(
    tmp_path: Path, upstream: Upstream, key_a: KeyPair, key_b: KeyPair, clock: ManualClock
) -> AsyncIterator[GatewayFactory]:
    """Start the gateway in-process on port 0 with a config edited by the test."""
    started: list[RunningGateway] = []

    async def start(
        edit: Callable[[dict[str, Any]], None] | None = None, **overrides: Any
    ) -> RunningGateway:
        config = copy.deepcopy(base_config(upstream.url))
        config.update(overrides)
        if edit is not None:
            edit(config)
        path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
        compiled = compile_config(load_settings(path, env={}), clock)
        lines: list[dict[str, Any]] = []
        server = GatewayServer(
            compiled,
            clock=clock,
            access_log=AccessLog(_CapturedLog(lines)),
        )
        await server.start()
        running = RunningGateway(server, clock, lines)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.server.stop()


ExampleFactory = Callable[[str, dict[str, str], dict[str, str]], Awaitable[RunningGateway]]

EXAMPLES = Path(__file__).resolve().parent.parent / "config"


@pytest.fixture
async def serve_example(
    tmp_path: Path, upstream: Upstream, clock: ManualClock
) -> AsyncIterator[ExampleFactory]:
    """Serve one of the shipped example configs, on loopback ports, in front of `upstream`.

    `key_files` maps the config's relative `pem_file` paths to PEM text; `env` fills its
    `${...}` secrets."""
    started: list[GatewayServer] = []

    async def start(name: str, key_files: dict[str, str], env: dict[str, str]) -> RunningGateway:
        config = yaml.safe_load((EXAMPLES / name).read_text())
        config.update(listen="127.0.0.1:0", admin_listen="127.0.0.1:0")
        config["upstream"] = {"url": upstream.url}
        for relative, pem in key_files.items():
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_text(pem)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        compiled = compile_config(load_settings(path, env=env), clock)
        lines: list[dict[str, Any]] = []
        server = GatewayServer(compiled, clock=clock, access_log=AccessLog(_CapturedLog(lines)))
        await server.start()
        started.append(server)
        return RunningGateway(server, clock, lines)

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> RunningGateway:
    return await make_gateway()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


# --- raw HTTP, for what a well-behaved client cannot send --------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(port: int, data: bytes, wait_seconds: float = 5) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait_seconds):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        return RawResponse(status, headers, body)
    finally:
        writer.close()


def _described(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str | Callable[[], str],
    seconds: float = 30,
    *,
    interval: float = 0.02,
    ignoring: tuple[type[BaseException], ...] = (aiohttp.ClientError,),
) -> T:
    """Await `check()` every `interval` seconds until it returns something truthy, and return
    that; once `seconds` have passed, fail naming `what` (text, or a function giving it then).
    An exception in `ignoring` (by default a client error: not listening yet) counts as not
    yet; any other fails at once."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = await check()
        except ignoring:
            pass
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {_described(what)}")
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T | None],
    what: str | Callable[[], str],
    seconds: float = 30,
    *,
    interval: float = 0.02,
    ignoring: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """`eventually` for a plain function, from code that is not a coroutine; by default an
    `OSError` (a socket not listening yet) counts as not yet."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
        except ignoring:
            pass
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {_described(what)}")
        time.sleep(interval)  # the poll interval, not a synchronisation point


def _listening_ports() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, from a random start, each handed out once.

    A port the kernel hands out for port 0 comes from the ephemeral range, where any outgoing
    connection on the machine may take it before the service the test starts binds it (seen as
    a gateway failing with "Address already in use"); below that range only listeners go."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    low, high = 10_000, first_ephemeral if 10_000 < first_ephemeral < 32_768 else 32_768
    start = low + secrets.randbelow(high - low)
    for port in itertools.chain(range(start, high), range(low, start)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # something listens there, or a connection of its own holds it
        yield port
    raise RuntimeError(f"no free loopback port left in {low}-{high - 1}")


_PORTS = _listening_ports()


def free_port() -> int:
    """A loopback port for a service a test starts; no other call returns it."""
    return next(_PORTS)


@pytest.fixture
def busy_address() -> Iterator[str]:
    """An address another socket already listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


@asynccontextmanager
async def gateway_process(
    config_path: Path,
    admin_listen: str,
    *,
    what: str = "the gateway to be ready",
    stdout: Path | None = None,
    stderr: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`gateway run -c CONFIG` as a real process, once its admin listener says it is ready;
    killed on the way out, with any workers it started. Its stdout and stderr go to the files
    named, else nowhere; `env`, `preexec_fn` and `cwd` are the child's. `-P`: the package it
    runs is the installed one (or the build PYTHONPATH names), never the working directory's."""
    with contextlib.ExitStack() as files:
        outputs = [
            files.enter_context(path.open("wb")) if path is not None else asyncio.subprocess.DEVNULL
            for path in (stdout, stderr)
        ]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "gateway", "run", "-c", str(config_path),
            stdout=outputs[0], stderr=outputs[1], env=env, preexec_fn=preexec_fn, cwd=cwd,
        )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                async with http.get(f"http://{admin_listen}/readyz") as response:
                    return response.status == 200

            await eventually(ready, what)
        yield process
    finally:
        for child in children_of(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if process.returncode is None:
            process.kill()
            await process.wait()


def children_of(pid: int) -> set[int]:
    """The processes whose parent is `pid` (a supervisor's workers)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


# --- upstreams a test shapes itself ------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve_app() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start an aiohttp upstream answering every path with `handler`; returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class SlowUpstream:
    """Answers after `release` is set, so a request can be held in flight."""

    url: str
    release: asyncio.Event
    arrived: asyncio.Event


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if request.headers.get("X-Hold") == "1":
            arrived.set()
            await release.wait()
        return web.Response(body=b'{"success": true}\n', content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield SlowUpstream(f"http://127.0.0.1:{runner.addresses[0][1]}", release, arrived)
    release.set()
    await runner.cleanup()
