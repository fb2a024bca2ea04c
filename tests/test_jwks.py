"""Keys from JWKS: a file in the config, and a URL served by a real JWKS server on loopback."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.base.clock import ManualClock
from gateway.config.compiled import compile_config
from gateway.config.settings import ConfigError, load_settings
from tests.conftest import (
    NOW,
    GatewayFactory,
    KeyPair,
    RunningGateway,
    eventually,
    write_config,
)

EVENTS = "/track/v2/projects/app/customers/events"
SMALL_RSA = rsa.generate_private_key(public_exponent=65537, key_size=1024)


def b64_int(value: int, length: int = 0) -> str:
    """`value` big-endian in base64url, in `length` bytes at least (EC coordinates are fixed)."""
    raw = value.to_bytes(max(length, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def rsa_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    numbers = private.public_key().public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "n": b64_int(numbers.n),
        "e": b64_int(numbers.e),
    }


def ec_jwk(private: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    numbers = private.public_key().public_numbers()
    return {
        "kty": "EC",
        "kid": kid,
        "crv": "P-256",
        "x": b64_int(numbers.x, 32),
        "y": b64_int(numbers.y, 32),
    }


def token_for(private: Any, kid: str, alg: str = "RS256", user: str = "alice") -> str:
    claims = {"sub": {"key": "uid", "value": user}, "exp": int(NOW) + 600}
    return jwt.encode(claims, private, algorithm=alg, headers={"kid": kid})


async def post(
    http: aiohttp.ClientSession, gateway: RunningGateway, token: str | None, user: str = "alice"
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["X-Sdk-Auth-Token"] = token
    body = json.dumps({"customer_ids": {"registered": user}})
    async with http.post(gateway.url + EVENTS, data=body, headers=headers) as response:
        return response.status, await response.json()


# --- jwks_file ---------------------------------------------------------------------------------


async def test_jwks_file_keys_verify(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tmp_path: Path, key_a: KeyPair
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    document = {"keys": [rsa_jwk(key_a.private, "file-rsa"), ec_jwk(ec_key, "file-ec")]}
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "app.jwks.json").write_text(json.dumps(document))

    def from_file(config: dict[str, Any]) -> None:
        project = config["projects"]["app"]
        project.update(keys=[], jwks_file="keys/app.jwks.json", algorithms=["RS256", "ES256"])

    gateway = await make_gateway(from_file)
    assert (await post(http, gateway, token_for(key_a.private, "file-rsa")))[0] == 200
    assert (await post(http, gateway, token_for(ec_key, "file-ec", "ES256")))[0] == 200


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"nokeys": []}, r'expected \{"keys": \[\.\.\.\]\}'),
        ({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}, r"keys\[0\]: kid is missing"),
        (
            {"keys": [{"kty": "RSA", "kid": "x", "n": "AQAB", "e": "AQAB", "d": "AQAB"}]},
            r"keys\[0\]: holds private key parameters; publish public keys only",
        ),
        (
            {"keys": [rsa_jwk(SMALL_RSA, "x")]},
            r"keys\[0\]: RSA key is 1024 bits; at least 2048 required",
        ),
        (
            {"keys": [{"kty": "EC", "kid": "x", "crv": "P-192", "x": "AA", "y": "AA"}]},
            r"keys\[0\]: crv must be one of P-256, P-384, P-521",
        ),
    ],
)
def test_bad_jwks_file_is_a_config_problem(
    tmp_path: Path, key_a: KeyPair, key_b: KeyPair, document: Any, message: str
) -> None:
    config: dict[str, Any] = {
        "projects": {"app": {"mode": "required", "jwks_file": "app.jwks.json"}},
        "routes": [{"name": "r", "methods": ["POST"], "path": "/{project}", "auth": ["none"]}],
    }
    path = write_config(tmp_path, config, {})
    (tmp_path / "app.jwks.json").write_text(json.dumps(document))
    with pytest.raises(ConfigError) as raised:
        compile_config(load_settings(path, env={}), ManualClock(NOW))
    [problem] = raised.value.problems
    assert problem.path == "projects.app.jwks_file"
    assert re.fullmatch(rf"app\.jwks\.json: {message}", problem.message), problem


def test_jwks_file_kid_may_not_repeat_a_configured_id(tmp_path: Path, key_a: KeyPair) -> None:
    config: dict[str, Any] = {
        "projects": {
            "app": {
                "mode": "required",
                "keys": [{"id": "k", "pem_file": "keys/a.pem"}],
                "jwks_file": "app.jwks.json",
            }
        },
        "routes": [{"name": "r", "methods": ["POST"], "path": "/{project}", "auth": ["none"]}],
    }
    path = write_config(tmp_path, config, {"a.pem": key_a})
    (tmp_path / "app.jwks.json").write_text(json.dumps({"keys": [rsa_jwk(key_a.private, "k")]}))
    with pytest.raises(ConfigError) as raised:
        compile_config(load_settings(path, env={}), ManualClock(NOW))
    assert [str(p) for p in raised.value.problems] == [
        "projects.app.jwks_file: kid 'k' is already the id of keys[0]"
    ]


def test_jwks_url_must_be_https_unless_loopback(tmp_path: Path) -> None:
    config: dict[str, Any] = {
        "projects": {"app": {"mode": "required", "jwks_url": "http://auth.example.com/jwks"}},
        "routes": [{"name": "r", "methods": ["POST"], "path": "/{project}", "auth": ["none"]}],
    }
    path = write_config(tmp_path, config, {})
    with pytest.raises(ConfigError) as raised:
        load_settings(path, env={})
    assert str(raised.value.problems[0]).startswith(
        "projects.app.jwks_url: must be https:// (http:// only to a loopback address)"
    )


# --- jwks_url ----------------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str
    keys: list[dict[str, Any]]
    hits: int = 0
    status: int = 200
    redirect_to: str | None = None
    log: list[str] = field(default_factory=list)


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer("", [])

    async def serve(request: web.Request) -> web.Response:
        server.hits += 1
        if server.redirect_to:
            raise web.HTTPFound(server.redirect_to)
        if server.status != 200:
            return web.Response(status=server.status)
        return web.json_response({"keys": server.keys})

    app = web.Application()
    app.router.add_get("/jwks.json", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/jwks.json"
    yield server
    await runner.cleanup()


def use_url(url: str, refetch: int = 1) -> Any:
    def edit(config: dict[str, Any]) -> None:
        config["projects"]["app"].update(
            keys=[], jwks_url=url, jwks_refresh_seconds=3600, jwks_min_refetch_seconds=refetch
        )

    return edit


async def wait_ready(http: aiohttp.ClientSession, gateway: RunningGateway) -> None:
    async def ready() -> bool:
        async with http.get(gateway.admin_url + "/readyz") as response:
            return response.status == 200

    await eventually(ready, "readiness", 10, ignoring=())


async def test_jwks_url_keys_and_rotation_by_unknown_kid(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    jwks_server: JwksServer,
    key_a: KeyPair,
    key_b: KeyPair,
) -> None:
    jwks_server.keys = [rsa_jwk(key_a.private, "url-a")]
    gateway = await make_gateway(use_url(jwks_server.url, refetch=3600))
    await wait_ready(http, gateway)
    assert (await post(http, gateway, token_for(key_a.private, "url-a")))[0] == 200
    # The backend rotates: a token names a kid the gateway has not seen; one refetch finds it.
    jwks_server.keys.append(rsa_jwk(key_b.private, "url-b"))
    keys = gateway.server.config.project("app").keys
    keys._last_attempt = -float("inf")  # as if min_refetch had passed since the first fetch
    hits = jwks_server.hits
    assert (await post(http, gateway, token_for(key_b.private, "url-b")))[0] == 200
    assert jwks_server.hits == hits + 1
    # A second unknown kid inside jwks_min_refetch_seconds does not fetch again.
    status, body = await post(http, gateway, token_for(key_b.private, "url-c"))
    assert (status, body["error"]["reason"]) == (401, "kid_unknown")
    assert jwks_server.hits == hits + 1


async def test_unreadable_jwks_is_503_for_identified_traffic_only(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    jwks_server: JwksServer,
    key_a: KeyPair,
) -> None:
    jwks_server.status = 500
    gateway = await make_gateway(use_url(jwks_server.url))
    async with http.get(gateway.admin_url + "/readyz") as response:
        assert response.status == 503
    status, body = await post(http, gateway, token_for(key_a.private, "url-a"))
    assert (status, body["error"]["code"]) == (503, "KEYS_UNAVAILABLE")
    assert body["token_expired"] is False
    anonymous = {"Content-Type": "application/json"}
    async with http.post(gateway.url + EVENTS, data=b"{}", headers=anonymous) as response:
        assert response.status == 200


async def test_last_good_copy_survives_an_outage(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    jwks_server: JwksServer,
    key_a: KeyPair,
) -> None:
    jwks_server.keys = [rsa_jwk(key_a.private, "url-a")]
    gateway = await make_gateway(use_url(jwks_server.url))
    await wait_ready(http, gateway)
    jwks_server.status = 503
    keys = gateway.server.config.project("app").keys
    keys._last_attempt = -float("inf")
    # An unknown kid triggers a refetch that fails: the good copy stays, the kid is unknown.
    status, body = await post(http, gateway, token_for(key_a.private, "url-x"))
    assert (status, body["error"]["reason"]) == (401, "kid_unknown")
    assert (await post(http, gateway, token_for(key_a.private, "url-a")))[0] == 200


async def test_a_key_removed_from_the_jwks_fails_at_once(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    jwks_server: JwksServer,
    key_a: KeyPair,
    key_b: KeyPair,
) -> None:
    jwks_server.keys = [rsa_jwk(key_a.private, "url-a"), rsa_jwk(key_b.private, "url-b")]
    gateway = await make_gateway(use_url(jwks_server.url))
    await wait_ready(http, gateway)
    token = token_for(key_a.private, "url-a")
    assert (await post(http, gateway, token))[0] == 200  # now cached
    jwks_server.keys = [rsa_jwk(key_b.private, "url-b")]
    async with aiohttp.ClientSession() as session:
        await gateway.server.config.project("app").keys.fetch(session)  # the periodic refresh
    status, body = await post(http, gateway, token)
    assert (status, body["error"]["reason"]) == (401, "kid_unknown")


async def test_redirect_to_another_origin_is_refused(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    jwks_server: JwksServer,
) -> None:
    jwks_server.redirect_to = "http://localhost:1/jwks.json"
    gateway = await make_gateway(use_url(jwks_server.url))
    async with http.get(gateway.admin_url + "/readyz") as response:
        assert response.status == 503
    assert not gateway.server.jwks.ready
