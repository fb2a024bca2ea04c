"""Each vendor design end to end, with tokens minted the way that vendor's docs describe."""

from __future__ import annotations

import base64
import hmac as hmac_module
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from multidict import CIMultiDict

from tests.conftest import (
    EXAMPLES,
    ExampleFactory,
    GatewayFactory,
    KeyPair,
    RunningGateway,
    Tokens,
    Upstream,
    b64url,
)

API_KEY = "public-api-key-0123456789"
CUSTOMER_SECRET = "c" * 32
STREAM_SECRET = "s" * 64
BLOOMREACH_ENV = {
    "SHOP_EU_PUBLIC_API_KEY": API_KEY,
    "SHOP_EU_KEY_7_SECRET": CUSTOMER_SECRET,
    "STREAM_ORDERS_SECRET": STREAM_SECRET,
}


def public_pem(private: Any) -> str:
    pem: bytes = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


async def call(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(gateway.url + path, data=json.dumps(body), headers=all_headers) as reply:
        raw = await reply.read()
        return reply.status, json.loads(raw) if raw else {}, CIMultiDict(reply.headers)


# --- Bloomreach --------------------------------------------------------------------------------


def customer_token(ids: dict[str, str], *, ttl: int = 3600, now: float, **header: Any) -> str:
    """A Bloomreach customer token: HS256, `kid` = the private API key id, `sub` = the ids."""
    return jwt.encode(
        {"sub": ids, "exp": int(now + ttl)},
        CUSTOMER_SECRET,
        algorithm="HS256",
        headers={"kid": "private-api-key-7", **header},
    )


def stream_token(ids: dict[str, str], *, now: float) -> str:
    """A Bloomreach stream token: HS512, the ids in `ids`."""
    return jwt.encode(
        {"ids": ids, "exp": int(now + 600)},
        STREAM_SECRET,
        algorithm="HS512",
        headers={"kid": "stream-key-1"},
    )


EVENTS = "/track/v2/projects/shop-eu/customers/events"


@pytest.fixture
async def bloomreach(serve_example: ExampleFactory) -> RunningGateway:
    return await serve_example("bloomreach.yaml", {}, BLOOMREACH_ENV)


async def test_bloomreach_api_key_is_required(
    http: aiohttp.ClientSession, bloomreach: RunningGateway, upstream: Upstream
) -> None:
    anonymous = {"customer_ids": {"cookie": "c-1"}}
    status, body, _ = await call(http, bloomreach, EVENTS, anonymous)
    assert status == 401
    assert body["code"] == "API_KEY_NOT_PROVIDED"
    status, body, _ = await call(
        http, bloomreach, EVENTS, anonymous, {"Authorization": "Token wrong-key"}
    )
    assert (status, body["code"]) == (401, "API_KEY_REJECTED")
    status, body, _ = await call(
        http, bloomreach, EVENTS, anonymous, {"Authorization": f"Token {API_KEY}"}
    )
    assert (status, body) == (200, {"success": True})
    assert upstream.last_headers()["x-auth-status"] == "anonymous"
    assert upstream.last_headers()["authorization"] == f"Token {API_KEY}"


async def test_bloomreach_missing_token_is_403_in_its_own_shape(
    http: aiohttp.ClientSession, bloomreach: RunningGateway
) -> None:
    ids = {"customer_ids": {"registered": "alice", "cookie": "c-1"}}
    status, body, headers = await call(
        http, bloomreach, EVENTS, ids, {"Authorization": f"Token {API_KEY}"}
    )
    assert status == 403
    assert list(body)[:5] == ["token_expired", "success", "error", "code", "reason"]
    assert body["token_expired"] is False
    assert body["success"] is False
    assert body["code"] == "TOKEN_NOT_PROVIDED"
    assert body["request_id"] == headers["X-Request-Id"]


async def test_bloomreach_customer_token_flow(
    http: aiohttp.ClientSession, bloomreach: RunningGateway, upstream: Upstream
) -> None:
    now = bloomreach.clock.now()
    token = customer_token({"registered": "alice", "email": "a@example.com"}, now=now)
    # Both headers may be `Authorization`: the API key by scheme Token, the JWT by Bearer.
    headers = {"Authorization": f"Token {API_KEY}", "X-Sdk": "1"}
    async with http.post(
        bloomreach.url + EVENTS,
        data=json.dumps({"customer_ids": {"registered": "alice", "cookie": "c-9"}}),
        headers=[
            ("Content-Type", "application/json"),
            ("Authorization", headers["Authorization"]),
            ("Authorization", f"Bearer {token}"),
        ],
    ) as reply:
        assert reply.status == 200
    forwarded = upstream.received[-1].headers
    assert ("X-Auth-Status", "verified") in forwarded
    assert ("X-Authenticated-User", '{"registered":"alice"}') in forwarded
    assert [v for k, v in forwarded if k.lower() == "authorization"] == [f"Token {API_KEY}"]


async def test_bloomreach_extra_hard_id_is_impersonation(
    http: aiohttp.ClientSession, bloomreach: RunningGateway, upstream: Upstream
) -> None:
    now = bloomreach.clock.now()
    token = customer_token({"registered": "alice"}, now=now)
    body = {"customer_ids": {"registered": "alice", "email": "victim@example.com"}}
    headers = {"X-Api": "1"}
    status, answer, _ = await call(
        http,
        bloomreach,
        EVENTS,
        body,
        {"Authorization": f"Token {API_KEY}", **headers, "X-Other": "x"},
    )
    assert status == 403  # no token at all
    async with http.post(
        bloomreach.url + EVENTS,
        data=json.dumps(body),
        headers=[
            ("Content-Type", "application/json"),
            ("Authorization", f"Token {API_KEY}"),
            ("Authorization", f"Bearer {token}"),
        ],
    ) as reply:
        answer = await reply.json()
        assert reply.status == 401
    assert answer["code"] == "TOKEN_REJECTED"
    assert answer["reason"] == "subject_mismatch"
    assert upstream.received == []


async def test_bloomreach_expired_customer_token(
    http: aiohttp.ClientSession, bloomreach: RunningGateway
) -> None:
    now = bloomreach.clock.now()
    token = customer_token({"registered": "alice"}, ttl=-300, now=now)
    async with http.post(
        bloomreach.url + EVENTS,
        data=json.dumps({"customer_ids": {"registered": "alice"}}),
        headers=[
            ("Content-Type", "application/json"),
            ("Authorization", f"Token {API_KEY}"),
            ("Authorization", f"Bearer {token}"),
        ],
    ) as reply:
        assert reply.status == 401
        raw = await reply.read()
    assert raw.startswith(b'{"token_expired":true,')  # the Android SDK reads the first bytes
    assert json.loads(raw)["code"] == "TOKEN_EXPIRED"


async def test_bloomreach_stream_token(
    http: aiohttp.ClientSession, bloomreach: RunningGateway, upstream: Upstream
) -> None:
    path = "/data/v2/streams/stream-orders/customers/events"
    now = bloomreach.clock.now()
    body = {"customer_ids": {"registered": "order-7"}}
    good = stream_token({"registered": "order-7"}, now=now)
    status, _, _ = await call(http, bloomreach, path, body, {"Authorization": f"Bearer {good}"})
    assert status == 200
    assert upstream.last_headers()["x-authenticated-user"] == '{"registered":"order-7"}'
    # A customer token (HS256) is not a stream token.
    wrong = customer_token({"registered": "order-7"}, now=now)
    status, answer, _ = await call(
        http, bloomreach, path, body, {"Authorization": f"Bearer {wrong}"}
    )
    assert (status, answer["reason"]) == (401, "alg_not_allowed")


async def test_bloomreach_batch_checks_every_command(
    http: aiohttp.ClientSession, bloomreach: RunningGateway
) -> None:
    now = bloomreach.clock.now()
    token = customer_token({"registered": "alice"}, now=now)
    batch = {
        "commands": [
            {"name": "customers/events", "data": {"customer_ids": {"registered": "alice"}}},
            {"name": "customers/events", "data": {"customer_ids": {"cookie": "c-3"}}},
            {"name": "customers/events", "data": {"customer_ids": {"registered": "bob"}}},
        ]
    }
    async with http.post(
        bloomreach.url + "/track/v2/projects/shop-eu/batch",
        data=json.dumps(batch),
        headers=[
            ("Content-Type", "application/json"),
            ("Authorization", f"Token {API_KEY}"),
            ("Authorization", f"Bearer {token}"),
        ],
    ) as reply:
        assert reply.status == 400
        assert (await reply.json())["reason"] == "identity_conflict"


async def test_bloomreach_cors(http: aiohttp.ClientSession, bloomreach: RunningGateway) -> None:
    origin = "https://shop.example.com"
    preflight_headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    async with http.options(bloomreach.url + EVENTS, headers=preflight_headers) as reply:
        assert reply.status == 204
        assert reply.headers["Access-Control-Allow-Origin"] == origin
        assert "POST" in reply.headers["Access-Control-Allow-Methods"]
        allowed = reply.headers["Access-Control-Allow-Headers"]
        assert "authorization" in allowed
        assert "content-type" in allowed
    # The gateway's own error still carries CORS headers, so the page can read token_expired.
    status, _, headers = await call(
        http, bloomreach, EVENTS, {"customer_ids": {"cookie": "c"}}, {"Origin": origin}
    )
    assert status == 401
    assert headers["Access-Control-Allow-Origin"] == origin
    assert "X-Request-Id" in headers["Access-Control-Expose-Headers"]
    status, _, headers = await call(
        http,
        bloomreach,
        EVENTS,
        {"customer_ids": {"cookie": "c"}},
        {"Origin": "https://evil.example", "Authorization": f"Token {API_KEY}"},
    )
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with http.options(bloomreach.url + EVENTS, headers=evil) as reply:
        assert reply.status == 405
        assert "Access-Control-Allow-Origin" not in reply.headers


# --- MoEngage ----------------------------------------------------------------------------------


async def test_moengage_example(
    http: aiohttp.ClientSession,
    serve_example: ExampleFactory,
    upstream: Upstream,
    key_a: KeyPair,
    key_b: KeyPair,
    clock: Any,
) -> None:
    gateway = await serve_example(
        "moengage.yaml",
        {
            "keys/moengage-a.public.pem": key_a.public_pem,
            "keys/moengage-b.public.pem": key_b.public_pem,
        },
        {},
    )
    tokens = Tokens(key_a, clock, kid="2026-a")
    rotated = Tokens(key_b, clock, kid="2026-b")
    body = {"meta": {"uid": "alice"}, "event": "purchase"}
    for token in (tokens.good(), rotated.mint(rotated.claims(), alg="RS512")):
        status, _, _ = await call(
            http, gateway, "/v2/report/app-prod", body, {"Authorization": f"Bearer {token}"}
        )
        assert status == 200
    status, answer, _ = await call(
        http,
        gateway,
        "/v2/report/app-prod",
        body,
        {"Authorization": f"Bearer {tokens.good('mallory')}"},
    )
    assert (status, answer["error"]["reason"]) == (401, "subject_mismatch")
    batch = {"events": [{"meta": {"uid": "alice"}}, {"meta": {"uid": "alice"}}]}
    status, _, _ = await call(
        http,
        gateway,
        "/v2/report/app-prod/batch",
        batch,
        {"Authorization": f"Bearer {tokens.good()}"},
    )
    assert status == 200


# --- Braze -------------------------------------------------------------------------------------


async def test_braze_example_in_monitor(
    http: aiohttp.ClientSession,
    serve_example: ExampleFactory,
    upstream: Upstream,
    key_a: KeyPair,
    clock: Any,
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    gateway = await serve_example(
        "braze.yaml",
        {
            "keys/braze-rsa.public.pem": key_a.public_pem,
            "keys/braze-ec.public.pem": public_pem(ec_key),
        },
        {},
    )
    now = int(clock.now())
    es256 = jwt.encode(
        {"sub": "user-42", "exp": now + 600}, ec_key, algorithm="ES256", headers={"kid": "ec-2026"}
    )
    path = "/api/v3/data/braze-app"
    body = {"user_id": "user-42", "session_id": "s-1", "events": []}
    status, _, _ = await call(http, gateway, path, body, {"X-Braze-Auth-Signature": es256})
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "verified"
    assert upstream.last_headers()["x-authenticated-user"] == "user-42"
    other = {**body, "user_id": "user-43"}
    status, _, _ = await call(http, gateway, path, other, {"X-Braze-Auth-Signature": es256})
    assert status == 200  # monitor forwards what required would reject
    assert upstream.last_headers()["x-auth-status"] == "unverified"
    day_long = jwt.encode(
        {"sub": "user-42", "exp": now + 2 * 86400},
        ec_key,
        algorithm="ES256",
        headers={"kid": "ec-2026"},
    )
    await call(http, gateway, path, body, {"X-Braze-Auth-Signature": day_long})
    assert upstream.last_headers()["x-auth-status"] == "unverified"


# --- Segment / RudderStack ----------------------------------------------------------------------

WRITE_KEY = "Basic " + base64.b64encode(b"segment-write-key:").decode()


@pytest.fixture
async def segment(serve_example: ExampleFactory, key_a: KeyPair) -> RunningGateway:
    return await serve_example(
        "segment.yaml", {"keys/segment-rsa.public.pem": key_a.public_pem}, {}
    )


def segment_token(key: KeyPair, user: str, now: float) -> str:
    """What the customer's backend signs for Segment's SDK: `sub` is the userId itself."""
    claims = {"sub": user, "exp": int(now + 600)}
    return jwt.encode(claims, key.private_pem, algorithm="RS256", headers={"kid": "rsa-2026"})


async def segment_post(
    http: aiohttp.ClientSession, gateway: RunningGateway, path: str, body: Any, token: str | None
) -> tuple[int, dict[str, Any]]:
    """As the SDK sends it: the write key as `Authorization: Basic`, the token as `Bearer`."""
    headers = [("Content-Type", "application/json"), ("Authorization", WRITE_KEY)]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    async with http.post(gateway.url + path, data=json.dumps(body), headers=headers) as reply:
        return reply.status, await reply.json()


async def test_segment_verified_user_on_every_route(
    http: aiohttp.ClientSession, segment: RunningGateway, upstream: Upstream, key_a: KeyPair
) -> None:
    token = segment_token(key_a, "alice", segment.clock.now())
    event = {"userId": "alice", "anonymousId": "anon-1", "type": "track", "event": "Signed Up"}
    bodies = {
        "/v1/track": event,
        "/v1/identify": {**event, "type": "identify", "traits": {"plan": "pro"}},
        "/v1/batch": {"batch": [event, {"anonymousId": "anon-1", "type": "page"}, event]},
    }
    for path, body in bodies.items():
        status, answer = await segment_post(http, segment, path, body, token)
        assert (status, answer) == (200, {"success": True}), path
        forwarded = upstream.received[-1].headers
        assert ("X-Auth-Status", "verified") in forwarded
        assert ("X-Authenticated-User", "alice") in forwarded
        # The write key reaches the tracking API; the token does not.
        assert [v for k, v in forwarded if k.lower() == "authorization"] == [WRITE_KEY]
    assert [r.path_qs for r in upstream.received] == list(bodies)


async def test_segment_anonymous_events_need_no_token(
    http: aiohttp.ClientSession, segment: RunningGateway, upstream: Upstream
) -> None:
    page = {"anonymousId": "anon-1", "type": "page", "name": "Home"}
    for path, body in (("/v1/track", page), ("/v1/batch", {"batch": [page, page]})):
        status, _ = await segment_post(http, segment, path, body, None)
        assert status == 200, path
        assert upstream.last_headers()["x-auth-status"] == "anonymous"


async def test_segment_null_user_id_is_anonymous(
    http: aiohttp.ClientSession, segment: RunningGateway, upstream: Upstream
) -> None:
    """analytics.js sends `"userId": null` until the user is identified."""
    page = {"userId": None, "anonymousId": "anon-1", "type": "page", "name": "Home"}
    for path, body in (("/v1/track", page), ("/v1/batch", {"batch": [page, page]})):
        status, answer = await segment_post(http, segment, path, body, None)
        assert (status, answer) == (200, {"success": True}), path
        assert upstream.last_headers()["x-auth-status"] == "anonymous"


async def test_segment_refuses_another_users_events(
    http: aiohttp.ClientSession, segment: RunningGateway, upstream: Upstream, key_a: KeyPair
) -> None:
    token = segment_token(key_a, "alice", segment.clock.now())
    mallory = {"userId": "mallory", "anonymousId": "anon-1", "type": "identify"}
    status, answer = await segment_post(http, segment, "/v1/identify", mallory, token)
    assert (status, answer["error"]["reason"]) == (401, "subject_mismatch")
    alice = {**mallory, "userId": "alice"}
    batch = {"batch": [alice, mallory]}
    status, answer = await segment_post(http, segment, "/v1/batch", batch, token)
    assert (status, answer["error"]["reason"]) == (400, "identity_conflict")
    status, answer = await segment_post(http, segment, "/v1/track", alice, None)
    assert (status, answer["error"]["code"]) == (401, "TOKEN_NOT_PROVIDED")
    assert upstream.received == []


# --- Amplitude ---------------------------------------------------------------------------------


async def test_amplitude_example(
    http: aiohttp.ClientSession, serve_example: ExampleFactory, upstream: Upstream
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    gateway = await serve_example(
        "amplitude.yaml", {"keys/amplitude-ec.public.pem": public_pem(ec_key)}, {}
    )
    now = int(gateway.clock.now())
    token = jwt.encode(
        {"sub": "alice", "exp": now + 600}, ec_key, algorithm="ES256", headers={"kid": "ec-2026"}
    )
    bearer = {"Authorization": f"Bearer {token}"}
    path = "/2/httpapi"

    def upload(*events: dict[str, Any]) -> dict[str, Any]:
        return {"api_key": "amplitude-project-key", "events": list(events)}

    alice = {"user_id": "alice", "device_id": "d-1", "event_type": "purchase"}
    anonymous = {"device_id": "d-1", "event_type": "app_open"}
    status, _, _ = await call(http, gateway, path, upload(alice, anonymous, alice), bearer)
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "verified"
    assert upstream.last_headers()["x-authenticated-user"] == "alice"
    assert "authorization" not in upstream.last_headers()

    status, _, _ = await call(http, gateway, path, upload(anonymous, anonymous))
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "anonymous"

    forwarded = len(upstream.received)
    mallory = {**alice, "user_id": "mallory"}
    status, answer, _ = await call(http, gateway, path, upload(mallory), bearer)
    assert (status, answer["error"]["reason"]) == (401, "subject_mismatch")
    status, answer, _ = await call(http, gateway, path, upload(alice))
    assert (status, answer["error"]["code"]) == (401, "TOKEN_NOT_PROVIDED")
    assert len(upstream.received) == forwarded


# --- every algorithm family, and keys of different types in one project -----------------------


def _project_keys(
    config: dict[str, Any], keys: list[dict[str, Any]], algorithms: list[str]
) -> None:
    config["projects"]["app"]["keys"] = keys
    config["projects"]["app"]["algorithms"] = algorithms


@pytest.mark.parametrize(
    ("alg", "make_key"),
    [
        ("PS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("PS512", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("ES384", lambda: ec.generate_private_key(ec.SECP384R1())),
        ("ES512", lambda: ec.generate_private_key(ec.SECP521R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    ],
)
async def test_asymmetric_algorithm_families(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    clock: Any,
    alg: str,
    make_key: Any,
) -> None:
    private = make_key()

    def edit(config: dict[str, Any]) -> None:
        _project_keys(config, [{"id": "k", "pem": public_pem(private)}], [alg])

    gateway = await make_gateway(edit)
    now = int(clock.now())
    claims = {"sub": {"key": "uid", "value": "alice"}, "exp": now + 600}
    token = jwt.encode(claims, private, algorithm=alg, headers={"kid": "k"})
    body = {"customer_ids": {"registered": "alice"}}
    status, _, _ = await call(
        http, gateway, "/track/v2/projects/app/customers/events", body, {"X-Sdk-Auth-Token": token}
    )
    assert status == 200
    head, _, signature = token.split(".")
    tampered = f"{head}.{b64url(json.dumps({**claims, 'exp': now + 900}).encode())}.{signature}"
    status, answer, _ = await call(
        http,
        gateway,
        "/track/v2/projects/app/customers/events",
        body,
        {"X-Sdk-Auth-Token": tampered},
    )
    assert (status, answer["error"]["reason"]) == (401, "signature_invalid")


async def test_rsa_public_key_as_hmac_secret_is_refused(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, key_a: KeyPair, clock: Any
) -> None:
    """The classic confusion: an HS256 token "signed" with the RSA public key's PEM bytes."""

    def mixed(config: dict[str, Any]) -> None:
        keys = [{"id": "key-a", "pem_file": "keys/a.pem"}, {"id": "hmac", "secret": "h" * 32}]
        _project_keys(config, keys, ["RS256", "HS256"])

    gateway = await make_gateway(mixed)
    now = int(clock.now())
    claims = {"sub": {"key": "uid", "value": "alice"}, "exp": now + 600}
    header = {"alg": "HS256", "typ": "JWT", "kid": "key-a"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    mac = hmac_module.new(key_a.public_pem.encode(), signing_input.encode(), "sha256").digest()
    forged = f"{signing_input}.{b64url(mac)}"
    path = "/track/v2/projects/app/customers/events"
    body = {"customer_ids": {"registered": "alice"}}
    status, answer, _ = await call(http, gateway, path, body, {"X-Sdk-Auth-Token": forged})
    assert (status, answer["error"]["reason"]) == (401, "alg_not_allowed")
    kidless_header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    kidless_input = f"{kidless_header}.{b64url(json.dumps(claims).encode())}"
    kidless_mac = hmac_module.new(key_a.public_pem.encode(), kidless_input.encode(), "sha256")
    kidless = f"{kidless_input}.{b64url(kidless_mac.digest())}"
    status, answer, _ = await call(http, gateway, path, body, {"X-Sdk-Auth-Token": kidless})
    assert (status, answer["error"]["reason"]) == (401, "signature_invalid")
    # The other direction: an RS256 token naming the HMAC key's id.
    rs_for_hmac = jwt.encode(claims, key_a.private_pem, algorithm="RS256", headers={"kid": "hmac"})
    status, answer, _ = await call(http, gateway, path, body, {"X-Sdk-Auth-Token": rs_for_hmac})
    assert (status, answer["error"]["reason"]) == (401, "alg_not_allowed")
    # And both genuine tokens pass.
    for token in (
        jwt.encode(claims, "h" * 32, algorithm="HS256", headers={"kid": "hmac"}),
        jwt.encode(claims, key_a.private_pem, algorithm="RS256", headers={"kid": "key-a"}),
    ):
        status, _, _ = await call(http, gateway, path, body, {"X-Sdk-Auth-Token": token})
        assert status == 200


async def test_pss_signature_needs_pss_algorithm(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, key_a: KeyPair, clock: Any
) -> None:
    def rs_only(config: dict[str, Any]) -> None:
        config["projects"]["app"]["algorithms"] = ["RS256"]

    gateway = await make_gateway(rs_only)
    now = int(clock.now())
    claims = {"sub": {"key": "uid", "value": "alice"}, "exp": now + 600}
    header = {"alg": "RS256", "typ": "JWT", "kid": "key-a"}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), 32)
    signature = key_a.private.sign(signing_input.encode(), pss, hashes.SHA256())
    status, answer, _ = await call(
        http,
        gateway,
        "/track/v2/projects/app/customers/events",
        {"customer_ids": {"registered": "alice"}},
        {"X-Sdk-Auth-Token": f"{signing_input}.{b64url(signature)}"},
    )
    assert (status, answer["error"]["reason"]) == (401, "signature_invalid")


# --- the shipped examples pass `gateway check-config` -----------------------------------------


@pytest.mark.parametrize(
    ("name", "key_files", "env"),
    [
        ("moengage.yaml", ["keys/moengage-a.public.pem", "keys/moengage-b.public.pem"], {}),
        ("bloomreach.yaml", [], BLOOMREACH_ENV),
        ("braze.yaml", ["keys/braze-rsa.public.pem", "keys/braze-ec.public.pem"], {}),
        ("segment.yaml", ["keys/segment-rsa.public.pem"], {}),
        ("amplitude.yaml", ["keys/amplitude-ec.public.pem"], {}),
    ],
)
def test_example_passes_check_config(
    tmp_path: Path, key_a: KeyPair, name: str, key_files: list[str], env: dict[str, str]
) -> None:
    ec_pem = public_pem(ec.generate_private_key(ec.SECP256R1()))
    for relative in key_files:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(ec_pem if "-ec." in relative else key_a.public_pem)
    shutil.copy(EXAMPLES / name, tmp_path / name)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-c", str(tmp_path / name)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config OK:")
    assert "routes:" in result.stdout
