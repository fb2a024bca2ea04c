"""`gateway demo`: the sample tracking API and the gateway on freshly generated keys, with
ready-to-paste curl commands, until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from pathlib import Path

import jwt
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.base.clock import Clock
from gateway.http.sockets import bind
from gateway.runtime.process import GatewayServer, load_config
from gateway.tools.sample_upstream import make_sample_upstream

PROJECT = "demo"
KID = "demo-1"


def _demo_config(directory: Path, listen: str, admin: str, upstream_port: int) -> Path:
    config = {
        "listen": listen,
        "admin_listen": admin,
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "projects": {
            PROJECT: {
                "mode": "required",
                "keys": [{"id": KID, "pem_file": "demo.public.pem"}],
            }
        },
        "identity": [{"json": "customer_ids.registered"}, {"header": "X-User-Id"}],
        "token": [{"header": "Authorization", "scheme": "Bearer"}],
        "session": [{"header": "X-Session-Id"}],
        "routes": [
            {
                "name": "track-events",
                "methods": ["POST"],
                "path": "/track/v2/projects/{project}/customers/events",
                "auth": ["sdk_jwt"],
            }
        ],
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _curl_lines(url: str, token: str, expired: str) -> list[str]:
    events = f"{url}/track/v2/projects/{PROJECT}/customers/events"
    json_header = "-H 'Content-Type: application/json'"
    alice = """-d '{"customer_ids":{"registered":"alice"}}'"""
    return [
        "# anonymous: forwarded",
        f"""curl -s {events} {json_header} -d '{{"customer_ids":{{"cookie":"c-1"}}}}'""",
        "# alice with her token: verified",
        f"curl -s {events} {json_header} -H 'Authorization: Bearer {token}' {alice}",
        "# alice without a token: 401 TOKEN_NOT_PROVIDED",
        f"curl -s {events} {json_header} {alice}",
        "# alice with an expired token: 401 TOKEN_EXPIRED",
        f"curl -s {events} {json_header} -H 'Authorization: Bearer {expired}' {alice}",
        "# bob with alice's token: 401 TOKEN_REJECTED (subject_mismatch)",
        f"""curl -s {events} {json_header} -H 'Authorization: Bearer {token}' """
        """-d '{"customer_ids":{"registered":"bob"}}'""",
    ]


async def run_demo(listen: str, admin: str, upstream_port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as workdir:
        directory = Path(workdir)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (directory / "demo.public.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        upstream = web.AppRunner(make_sample_upstream(echo=True), access_log=None)
        await upstream.setup()
        await web.SockSite(upstream, bind(f"127.0.0.1:{upstream_port}")).start()
        config_path = _demo_config(directory, listen, admin, upstream_port)
        server = GatewayServer(load_config(config_path, Clock()))
        await server.start()
        now = int(time.time())
        sub = {"key": "uid", "value": "alice"}
        token = jwt.encode(
            {"sub": sub, "iat": now, "exp": now + 3600}, key, "RS256", headers={"kid": KID}
        )
        expired = jwt.encode(
            {"sub": sub, "iat": now - 7200, "exp": now - 3600}, key, "RS256", headers={"kid": KID}
        )
        print(f"gateway on http://{listen} (admin http://{admin}), sample tracking API on "
              f"http://127.0.0.1:{upstream_port}; Ctrl-C stops both.\n", flush=True)  # fmt: skip
        print("\n".join(_curl_lines(f"http://{listen}", token, expired)), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        with contextlib.suppress(asyncio.CancelledError):
            await stop.wait()
        await server.stop()
        await upstream.cleanup()
