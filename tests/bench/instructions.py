"""Instructions per request: comparing two versions of the gateway on a noisy machine.

    python -m tests.bench.instructions

CPU time per request on a shared machine moves by ±20% from one run to the next; instruction
counts hardly move. This runs a closed loop in one process (clients, the gateway's own server
with its access log to /dev/null, and a minimal upstream answering like nginx) under `valgrind
--tool=callgrind`, once with FEW and once with MANY requests, and prints (Ir(MANY) - Ir(FEW)) /
(MANY - FEW): what one more request costs, clients and upstream included (measure them alone
with INSTRUCTIONS_BYPASS=1, which sends the requests straight upstream). One refused request
goes first, so the failure counter holds a session and every verified request resets its own, as
in production. User space only: system calls are not counted, and OpenSSL's hashing takes a
slower path under valgrind than on the CPU, so token digests and session keys count high.

Environment: INSTRUCTIONS_MODE (required; or disabled), INSTRUCTIONS_FEW (200),
INSTRUCTIONS_MANY (1200), INSTRUCTIONS_CONNECTIONS (1: with more, how requests batch in the
event loop changes the count from run to run), INSTRUCTIONS_BYPASS (0), INSTRUCTIONS_FRESH (0;
1: every counted request carries a token never seen before, so each pays a verification and a
cache insertion). The build measured is the one Python imports: PYTHONPATH=$PWD/.venv/compiled:$PWD
PYTHONSAFEPATH=1 before the command counts the compiled one.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, cast

import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.base.clock import Clock
from gateway.runtime.process import GatewayServer, load_config
from gateway.telemetry.logs import AccessLog
from gateway.tools.cli import installed_build
from tests.bench import configs, dataset
from tests.bench.procs import BenchError

USERS = 200
UPSTREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 16\r\nConnection: keep-alive\r\n\r\n"
    + configs.UPSTREAM_BODY.encode()
)
_COLLECTED = re.compile(r"Collected : (\d+)")


class _Upstream(asyncio.Protocol):
    """Answers every request (framed by Content-Length) with the same small 200."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self._buffer[:end].split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            self._buffer = self._buffer[end + 4 + length :]
            assert self._transport is not None
            self._transport.write(UPSTREAM_ANSWER)


async def _client(port: int, requests: list[bytes], status: bytes = b"200") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for request in requests:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 " + status):
            raise BenchError(f"not a {status.decode()}: {head[:200]!r}")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
    writer.close()


def _request(port: int, line: str) -> bytes:
    token, _, body = line.rstrip("\n").split("\t")
    head = [
        f"POST {dataset.PATH} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Authorization: Bearer {token}",
        f"Content-Length: {len(body.encode())}",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body.encode()


async def closed_loop(
    workdir: Path, count: int, connections: int, bypass: bool, log: BinaryIO
) -> None:
    """Warm every token up, then send `count` more requests over `connections` connections."""
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(_Upstream, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    mode = os.environ.get("INSTRUCTIONS_MODE", "required")
    settings = configs.gateway_config(
        port=0,
        admin_port=0,
        upstream_port=upstream_port,
        public_key=workdir / "public.pem",
        mode=mode,
    )
    settings["listen"] = settings["admin_listen"] = "127.0.0.1:0"
    config = configs.write_yaml(workdir / "gateway.yaml", settings)
    server = GatewayServer(load_config(config, Clock()), access_log=AccessLog(log))
    await server.start()
    port = upstream_port if bypass else server.public_port
    lines = (workdir / "requests.tsv").read_text().splitlines()
    prepared = [_request(port, line) for line in lines]
    fresh = [_request(port, line) for line in (workdir / "fresh.tsv").read_text().splitlines()]

    async def send(total: int, requests: list[bytes] = prepared) -> None:
        slices = [
            [requests[i % len(requests)] for i in range(c, total, connections)]
            for c in range(connections)
        ]
        await asyncio.gather(*(_client(port, s) for s in slices if s))

    if not bypass and mode != "disabled":
        # As in production (and after the benchmark's smoke check): the failure counter holds
        # a session, so every verified request resets its own.
        refused = (workdir / "refused.tsv").read_text()
        await _client(port, [_request(port, refused)], status=b"401")
    await send(len(prepared))
    await send(count, fresh or prepared)
    await server.stop()
    upstream.close()


def _count(workdir: Path, count: int, valgrind: str) -> int:
    argv = [
        valgrind,
        "--tool=callgrind",
        f"--callgrind-out-file={workdir}/callgrind.{count}.out",
        sys.executable,
        "-m",
        "tests.bench.instructions",
        "--loop",
        str(workdir),
        str(count),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def prepare(workdir: Path, fresh: int) -> None:
    """One key and one request file for both counts: key generation and signing vary in cost.
    `fresh`: how many requests with tokens of their own to write besides (else none)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (workdir / "public.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    # A user outside the traffic, so no verified request resets the failure counted for them.
    outsider = dataset.event_body(USERS, dataset.user_name(USERS))
    mallory = dataset.sign_token(key, "mallory", now)
    (workdir / "refused.tsv").write_text(f"{mallory}\t\t{outsider}")
    with (workdir / "requests.tsv").open("w") as out:
        for i in range(USERS):
            user = dataset.user_name(i)
            out.write(f"{dataset.sign_token(key, user, now)}\t\t{dataset.event_body(i, user)}\n")
    with (workdir / "fresh.tsv").open("w") as out:
        for i in range(USERS + 1, USERS + 1 + fresh):
            user = dataset.user_name(i)
            out.write(f"{dataset.sign_token(key, user, now)}\t\t{dataset.event_body(i, user)}\n")


def main() -> int:
    if sys.argv[1:2] == ["--loop"]:
        connections = int(os.environ.get("INSTRUCTIONS_CONNECTIONS", "1"))
        bypass = os.environ.get("INSTRUCTIONS_BYPASS", "0") == "1"
        with open(os.devnull, "wb") as log:
            workdir, count = Path(sys.argv[2]), int(sys.argv[3])
            uvloop.run(closed_loop(workdir, count, connections, bypass, log))
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind not found (Debian: apt-get install -y valgrind)", file=sys.stderr)
        return 2
    few = int(os.environ.get("INSTRUCTIONS_FEW", "200"))
    many = int(os.environ.get("INSTRUCTIONS_MANY", "1200"))
    with tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmp:
        workdir = Path(tmp)
        fresh = os.environ.get("INSTRUCTIONS_FRESH", "0") == "1"
        prepare(workdir, max(few, many) if fresh else 0)
        try:
            counts = [_count(workdir, n, valgrind) for n in (few, many)]
        except BenchError as exc:
            print(exc, file=sys.stderr)
            return 1
    per_request = (counts[1] - counts[0]) / (many - few)
    mode = os.environ.get("INSTRUCTIONS_MODE", "required")
    build = installed_build()
    tokens = "fresh tokens" if os.environ.get("INSTRUCTIONS_FRESH", "0") == "1" else "reused tokens"
    print(
        f"{per_request:,.0f} instructions per request (mode {mode}, {tokens}, {build} build, "
        f"{few} and {many} requests)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
