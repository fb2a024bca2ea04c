"""The admin listener's safety: with `admin_token` set, reload and the running config need it
(401 otherwise), probes and metrics stay open; the running config never shows a secret, an API
key, a PEM or a credential, only fingerprints. Real admin requests to an in-process gateway and
to a `workers: 2` supervisor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config.view import fingerprint
from tests.conftest import (
    GatewayFactory,
    KeyPair,
    base_config,
    free_port,
    gateway_process,
    write_config,
)

TOKEN = "admin-token-0123456789abcdef"
API_KEY = "sdk-api-key-not-to-be-shown-1"
HMAC_SECRET = "an-hmac-secret-that-is-long-enough-for-hs256!"
REDIS_PASSWORD = "redis-password-not-to-be-shown"
INLINE_PEM = KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048)).public_pem


def with_secrets(config: dict[str, Any]) -> None:
    config["admin_token"] = TOKEN
    config["projects"]["keyed"] = {"mode": "disabled", "api_keys": [API_KEY]}
    config["projects"]["inline"] = {
        "mode": "required",
        "keys": [{"id": "inline-1", "pem": INLINE_PEM}],
    }
    config["projects"]["hs"] = {
        "mode": "required",
        "algorithms": ["HS256"],
        "keys": [{"id": "hs-1", "secret": HMAC_SECRET}],
    }
    config["failure_counter"] = {
        "backend": "memory",
        "redis_url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:6399/0",
    }


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None = None
) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.request(method, url, headers=headers) as response:
        return response.status, await response.text()


async def test_reload_and_config_need_the_token_and_probes_do_not(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(with_secrets)
    admin = gateway.admin_url
    for method, path in (("POST", "/-/reload"), ("GET", "/-/config")):
        assert (await status_of(http, method, admin + path))[0] == 401
        assert (await status_of(http, method, admin + path, "wrong-token-0123456789"))[0] == 401
        assert (await status_of(http, method, admin + path, TOKEN[:-1]))[0] == 401
        assert (await status_of(http, method, admin + path, TOKEN))[0] == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await status_of(http, "GET", admin + path))[0] == 200


async def test_the_running_config_shows_fingerprints_never_secrets(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(with_secrets)
    status, text = await status_of(http, "GET", gateway.admin_url + "/-/config", TOKEN)
    assert status == 200
    for secret in (TOKEN, API_KEY, HMAC_SECRET, REDIS_PASSWORD, INLINE_PEM.strip()):
        assert secret not in text
    assert "BEGIN PUBLIC KEY" not in text
    shown = json.loads(text)
    assert shown["config_digest"] == gateway.server.config.digest
    config = shown["config"]
    assert config["admin_token"] == fingerprint(TOKEN)
    assert config["projects"]["keyed"]["api_keys"] == [fingerprint(API_KEY)]
    assert config["projects"]["hs"]["keys"][0]["secret"] == fingerprint(HMAC_SECRET)
    assert config["projects"]["inline"]["keys"][0]["pem"] == fingerprint(INLINE_PEM)
    assert fingerprint(REDIS_PASSWORD) in config["failure_counter"]["redis_url"]
    assert config["upstream"]["url"] == gateway.server.config.settings.upstream.url


async def test_without_a_token_the_admin_endpoints_are_open(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    assert (await status_of(http, "GET", gateway.admin_url + "/-/config"))[0] == 200
    assert (await status_of(http, "POST", gateway.admin_url + "/-/reload"))[0] == 200


async def test_the_workers_supervisor_guards_its_admin_listener_too(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair, http: aiohttp.ClientSession
) -> None:
    config = base_config("http://127.0.0.1:9")
    with_secrets(config)
    admin_listen = f"127.0.0.1:{free_port()}"
    config.update(workers=2, listen=f"127.0.0.1:{free_port()}", admin_listen=admin_listen)
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    async with gateway_process(path, admin_listen):
        admin = f"http://{admin_listen}"
        assert (await status_of(http, "GET", admin + "/-/config"))[0] == 401
        assert (await status_of(http, "POST", admin + "/-/reload"))[0] == 401
        status, text = await status_of(http, "GET", admin + "/-/config", TOKEN)
        assert status == 200
        assert HMAC_SECRET not in text
        assert API_KEY not in text
        assert (await status_of(http, "POST", admin + "/-/reload", TOKEN))[0] == 200
        assert (await status_of(http, "GET", admin + "/healthz"))[0] == 200
        assert (await status_of(http, "GET", admin + "/-/config", "wrong-token-0123456789"))[
            0
        ] == 401
