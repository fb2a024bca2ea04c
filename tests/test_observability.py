"""What operators see: logs that never hold a credential, and a real Prometheus scraping a real
gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from tests.conftest import (
    KeyPair,
    Upstream,
    base_config,
    eventually,
    free_port,
    gateway_process,
    log_records,
    write_config,
)

EVENTS = "/track/v2/projects/app/customers/events"
REPO = Path(__file__).resolve().parent.parent
SECRET = "hmac-secret-that-must-never-be-logged-0123456789"
API_KEY = "api-key-that-must-never-be-logged-42"


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_no_token_secret_or_api_key_reaches_any_log(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    config = base_config(upstream.url)
    port, admin = free_port(), free_port()
    config.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}", log_level="debug")
    app = config["projects"]["app"]
    app["algorithms"] = ["RS256", "HS256"]
    app["keys"].append({"id": "hmac", "secret": "${APP_SECRET}"})
    app["api_keys"] = ["${APP_API_KEY}"]
    config["routes"].append(
        {
            "name": "keyed",
            "methods": ["POST"],
            "path": "/keyed/{project:app}",
            "auth": ["api_key", "sdk_jwt"],
            "token": [{"query": "token"}],
        }
    )
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    now = int(time.time())
    claims = {"sub": {"key": "uid", "value": "alice"}, "exp": now + 600}
    tokens = {
        "good": jwt.encode(claims, key_a.private_pem, "RS256", headers={"kid": "key-a"}),
        "hmac": jwt.encode(claims, SECRET, "HS256", headers={"kid": "hmac"}),
        "expired": jwt.encode(
            {**claims, "exp": now - 600}, key_a.private_pem, "RS256", headers={"kid": "key-a"}
        ),
        "forged": jwt.encode(claims, key_b.private_pem, "RS256", headers={"kid": "key-a"}),
    }
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    env = {
        "APP_SECRET": SECRET,
        "APP_API_KEY": API_KEY,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
    }
    async with gateway_process(
        path, f"127.0.0.1:{admin}", what="readiness", stdout=stdout, stderr=stderr, env=env
    ) as process:
        body = json.dumps({"customer_ids": {"registered": "alice"}})
        json_type = {"Content-Type": "application/json"}
        for token in tokens.values():
            for header in ("X-Sdk-Auth-Token", "Authorization"):
                value = token if header != "Authorization" else f"Bearer {token}"
                async with http.post(
                    f"http://127.0.0.1:{port}{EVENTS}",
                    data=body,
                    headers={**json_type, header: value},
                ) as response:
                    await response.read()
            url = f"http://127.0.0.1:{port}/keyed/app?token={token}"
            for key in (API_KEY, "wrong-" + API_KEY):
                headers = {**json_type, "Authorization": f"Token {key}"}
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
            # Requests aiohttp's parser refuses, with the token in the bytes it refuses.
            smuggling = (
                f"POST {EVENTS} HTTP/1.1\r\nX-Sdk-Auth-Token: {token}\r\n"
                "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            raw_exchange(port, smuggling.encode())
            raw_exchange(port, f"GET /{token}\x01 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            async with http.get(f"http://127.0.0.1:{port}/{token}") as response:
                assert response.status == 404  # a token pasted into a path
        # A reload whose problems would quote the secret if problems echoed values.
        broken = yaml.safe_load(path.read_text())
        broken["projects"]["app"]["keys"][1] = {"id": "hmac", "secret": SECRET, "pem": "x"}
        broken["projects"]["app"]["api_key"] = API_KEY
        path.write_text(yaml.safe_dump(broken))
        async with http.post(f"http://127.0.0.1:{admin}/-/reload") as response:
            assert response.status == 422
            assert SECRET not in await response.text()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0
    logs = stdout.read_text() + stderr.read_text()
    access = log_records(stdout.read_text())
    assert len(access) == 28  # every request was logged, the unparsable ones too ...
    assert sum(1 for record in access if record["reason"] == "http_malformed") == 8
    assert any(record["token_sha256"] for record in access)  # ... tokens only as fingerprints
    for secret in (SECRET, API_KEY, *tokens.values()):
        assert secret not in logs
    for token in tokens.values():
        for segment in token.split("."):
            assert segment not in logs


PROMETHEUS = shutil.which("prometheus")


def test_prometheus_is_installed() -> None:
    assert PROMETHEUS, "install Debian's `prometheus` package (the tests run a real Prometheus)"


def write_prometheus_config(directory: Path, admin_port: int) -> Path:
    scrape = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [
            str(Path(__file__).resolve().parent.parent / "deploy/prometheus/recording.yml")
        ],
        "scrape_configs": [
            {"job_name": "gateway", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}
        ],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(scrape))
    return path


@pytest.mark.timeout(120)
async def test_real_prometheus_scrapes_the_gateway(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    assert PROMETHEUS is not None
    config = base_config(upstream.url)
    port, admin, prometheus_port = free_port(), free_port(), free_port()
    config.update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin}")
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    prometheus_config = write_prometheus_config(tmp_path, admin)
    quiet = asyncio.subprocess.DEVNULL
    async with gateway_process(path, f"127.0.0.1:{admin}"):
        prometheus = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={prometheus_config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            stdout=quiet,
            stderr=quiet,
        )
        try:
            json_type = {"Content-Type": "application/json"}

            async def served() -> bool:
                url = f"http://127.0.0.1:{port}{EVENTS}"
                async with http.post(url, data=b"{}", headers=json_type) as response:
                    return response.status == 200

            await eventually(served, "the gateway to serve")
            result: list[Any] = []

            async with aiohttp.ClientSession() as client:  # Prometheus answers gzip-encoded

                async def scraped() -> bool:
                    query = (
                        'gateway_requests_total{route="track-events",project="app",status="200"}'
                    )
                    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query"
                    async with client.get(url, params={"query": query}) as response:
                        if response.status != 200:
                            return False
                        answer = await response.json()
                    result[:] = answer["data"]["result"]
                    return bool(result)

                await eventually(scraped, "Prometheus to scrape the gateway", 60)
            assert result[0]["metric"]["job"] == "gateway"
            assert float(result[0]["value"][1]) >= 1
        finally:
            prometheus.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await prometheus.wait()
            except TimeoutError:
                prometheus.kill()
                await prometheus.wait()
