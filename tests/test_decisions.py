"""The decision table, row by row, through real HTTP to a real upstream."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from multidict import CIMultiDictProxy

from tests.conftest import GatewayFactory, RunningGateway, Tokens, Upstream, b64url, sign_raw

EVENTS = "/track/v2/projects/app/customers/events"


async def post(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    body: Any,
    headers: dict[str, str] | None = None,
    path: str = EVENTS,
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(gateway.url + path, data=data, headers=all_headers) as response:
        raw = await response.read()
        parsed = json.loads(raw) if raw else {}
        return response.status, parsed, response.headers


def identified(user: str = "alice") -> dict[str, Any]:
    return {"customer_ids": {"registered": user}, "event_type": "purchase"}


ANONYMOUS = {"customer_ids": {"cookie": "c-123"}, "event_type": "view"}


async def test_anonymous_is_forwarded(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    status, body, headers = await post(http, gateway, ANONYMOUS)
    assert status == 200
    assert body == {"success": True}
    forwarded = upstream.last_headers()
    assert forwarded["x-auth-status"] == "anonymous"
    assert "x-authenticated-user" not in forwarded
    assert forwarded["x-request-id"] == headers["X-Request-Id"]


async def test_identity_without_token_is_token_not_provided(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    status, body, headers = await post(http, gateway, identified())
    assert status == 401
    assert list(body) == ["token_expired", "error"]
    assert body["token_expired"] is False
    assert body["error"]["code"] == "TOKEN_NOT_PROVIDED"
    assert body["error"]["reason"] == "token_missing"
    assert body["error"]["request_id"] == headers["X-Request-Id"]
    assert headers["WWW-Authenticate"] == "Bearer"
    assert headers["Content-Type"] == "application/json"
    assert upstream.received == []


async def test_valid_token_matching_identity_is_verified(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    status, _, headers = await post(
        http, gateway, identified(), {"X-Sdk-Auth-Token": tokens.good()}
    )
    assert status == 200
    forwarded = upstream.last_headers()
    assert forwarded["x-auth-status"] == "verified"
    assert forwarded["x-authenticated-user"] == "alice"
    assert "x-sdk-auth-token" not in forwarded  # forward_token: false strips it
    assert "X-Auth-Warning" not in headers


async def test_bearer_token_is_read_and_stripped(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    status, _, _ = await post(
        http, gateway, identified(), {"Authorization": f"Bearer {tokens.good()}"}
    )
    assert status == 200
    assert "authorization" not in upstream.last_headers()


async def test_valid_token_without_identity_is_verified(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    status, _, _ = await post(http, gateway, ANONYMOUS, {"X-Sdk-Auth-Token": tokens.good("bob")})
    assert status == 200
    assert upstream.last_headers()["x-authenticated-user"] == "bob"


async def test_token_for_another_user_is_subject_mismatch(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    status, body, headers = await post(
        http, gateway, identified("alice"), {"X-Sdk-Auth-Token": tokens.good("mallory")}
    )
    assert status == 401
    assert body["error"]["code"] == "TOKEN_REJECTED"
    assert body["error"]["reason"] == "subject_mismatch"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert upstream.received == []


async def test_expired_token_is_token_expired(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    status, body, headers = await post(
        http, gateway, identified(), {"X-Sdk-Auth-Token": tokens.expired()}
    )
    assert status == 401
    assert body["token_expired"] is True
    assert body["error"]["code"] == "TOKEN_EXPIRED"
    assert body["error"]["reason"] == "expired"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def test_expired_token_with_bad_signature_is_rejected_not_expired(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens, key_b: Any
) -> None:
    forged = tokens.mint(tokens.claims(ttl=-120), key=key_b)
    status, body, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": forged})
    assert status == 401
    assert body["token_expired"] is False
    assert body["error"]["reason"] == "signature_invalid"


async def test_leeway_accepts_recently_expired_token(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    token = tokens.mint(tokens.claims(ttl=-20))  # default leeway is 30 s
    status, _, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 200
    gateway.clock.advance(11)
    status, body, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 401
    assert body["error"]["code"] == "TOKEN_EXPIRED"


async def test_cached_token_still_expires(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    token = tokens.mint(tokens.claims(ttl=60))
    status, _, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 200
    gateway.clock.advance(60 + 30)
    status, body, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 401
    assert body["error"]["code"] == "TOKEN_EXPIRED"


REJECTED_CASES: list[tuple[str, str]] = [
    ("signature_invalid", "signature_invalid"),
    ("alg_not_allowed", "alg_not_allowed"),
    ("alg_missing", "alg_missing"),
    ("alg_none", "alg_not_allowed"),
    ("typ_wrong", "typ_invalid"),
    ("typ_missing", "typ_missing"),
    ("crit", "crit_unsupported"),
    ("kid_unknown", "kid_unknown"),
    ("exp_missing", "exp_missing"),
    ("exp_string", "exp_invalid"),
    ("exp_bool", "exp_invalid"),
    ("exp_too_large", "exp_invalid"),
    ("exp_negative", "exp_invalid"),
    ("nbf_future", "not_yet_valid"),
    ("nbf_string", "nbf_invalid"),
    ("iat_future", "issued_in_future"),
    ("iat_null", "iat_invalid"),
    ("sub_string", "subject_invalid"),
    ("sub_wrong_key", "subject_invalid"),
    ("sub_empty_value", "subject_invalid"),
    ("sub_extra_field", "subject_invalid"),
    ("header_duplicate_key", "duplicate_key"),
    ("payload_duplicate_key", "duplicate_key"),
    ("malformed", "malformed"),
    ("two_segments", "malformed"),
    ("padded_base64", "malformed"),
    ("non_canonical_base64", "malformed"),
    ("standard_alphabet_in_header", "malformed"),
    ("standard_alphabet_in_payload", "malformed"),
    ("space_in_payload", "malformed"),
    ("four_segments", "malformed"),
]


def make_bad_token(case: str, tokens: Tokens, key_b: Any) -> str:
    claims = tokens.claims()
    now = int(tokens.clock.now())
    header = b'{"alg":"RS256","typ":"JWT","kid":"key-a"}'
    payload = json.dumps(claims).encode()
    match case:
        case "signature_invalid":
            return tokens.mint(claims, key=key_b)
        case "alg_not_allowed":
            return tokens.mint(claims, alg="RS384")
        case "alg_missing":
            return sign_raw(b'{"typ":"JWT","kid":"key-a"}', payload, tokens.key)
        case "alg_none":
            return sign_raw(b'{"alg":"none","kid":"key-a"}', payload, tokens.key)
        case "typ_wrong":
            return tokens.mint(claims, headers={"typ": "at+jwt"})
        case "typ_missing":
            return sign_raw(b'{"alg":"RS256","kid":"key-a"}', payload, tokens.key)
        case "crit":
            return tokens.mint(claims, headers={"crit": ["exp"]})
        case "kid_unknown":
            return tokens.mint(claims, headers={"kid": "../../etc/passwd"})
        case "exp_missing":
            return tokens.mint({k: v for k, v in claims.items() if k != "exp"})
        case "exp_string":
            return sign_raw(
                header, json.dumps({**claims, "exp": str(now + 60)}).encode(), tokens.key
            )
        case "exp_bool":
            return sign_raw(header, json.dumps({**claims, "exp": True}).encode(), tokens.key)
        case "exp_too_large":
            return sign_raw(header, json.dumps({**claims, "exp": 2**53}).encode(), tokens.key)
        case "exp_negative":
            return sign_raw(header, json.dumps({**claims, "exp": -1}).encode(), tokens.key)
        case "nbf_future":
            return tokens.mint({**claims, "nbf": now + 600})
        case "nbf_string":
            return sign_raw(header, json.dumps({**claims, "nbf": "soon"}).encode(), tokens.key)
        case "iat_future":
            return tokens.mint({**claims, "iat": now + 600})
        case "iat_null":
            return sign_raw(header, json.dumps({**claims, "iat": None}).encode(), tokens.key)
        case "sub_string":
            return tokens.mint({**claims, "sub": "alice"})
        case "sub_wrong_key":
            return tokens.mint({**claims, "sub": {"key": "email", "value": "alice"}})
        case "sub_empty_value":
            return tokens.mint({**claims, "sub": {"key": "uid", "value": ""}})
        case "sub_extra_field":
            return tokens.mint({**claims, "sub": {"key": "uid", "value": "alice", "x": 1}})
        case "header_duplicate_key":
            dup = b'{"alg":"RS256","typ":"JWT","kid":"nope","kid":"key-a"}'
            return sign_raw(dup, payload, tokens.key)
        case "payload_duplicate_key":
            dup_payload = payload[:-1] + b', "sub": {"key": "uid", "value": "mallory"}}'
            return sign_raw(header, dup_payload, tokens.key)
        case "malformed":
            return "not-a-jwt"
        case "two_segments":
            return ".".join(tokens.good().split(".")[:2])
        case "padded_base64":
            head, body, sig = tokens.good().split(".")
            return f"{head}.{body}.{sig}=="
        case "non_canonical_base64":
            head, body, sig = tokens.good().split(".")
            # Flip unused low bits of the final character: decodes to the same bytes.
            last = sig[-1]
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            unused_bits = {2: 4, 3: 2}[len(sig) % 4]
            index = alphabet.index(last) ^ ((1 << unused_bits) - 1)
            return f"{head}.{body}.{sig[:-1]}{alphabet[index]}"
        case "standard_alphabet_in_header" | "standard_alphabet_in_payload" | "space_in_payload":
            # Signed as sent: only the characters are wrong, so it is refused as malformed
            # before (not because of) the signature.
            head, body = b64url(header), b64url(payload)
            if case == "standard_alphabet_in_header":
                head = head[:4] + "++++" + head[4:]
            else:  # four: whole groups, so that a reader skipping them sees no bad padding
                outsider = "/" if case == "standard_alphabet_in_payload" else " "
                body = body[:4] + outsider * 4 + body[4:]
            signing_input = f"{head}.{body}".encode()
            signature = tokens.key.private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
            return f"{signing_input.decode()}.{b64url(signature)}"
        case "four_segments":
            return tokens.good() + ".e30"
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "reason"), REJECTED_CASES)
async def test_bad_token_is_rejected(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    key_b: Any,
    case: str,
    reason: str,
) -> None:
    token = make_bad_token(case, tokens, key_b)
    status, body, headers = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 401, body
    assert body["token_expired"] is False
    assert body["error"]["code"] == "TOKEN_REJECTED"
    assert body["error"]["reason"] == reason
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert upstream.received == []


async def test_require_typ_false_accepts_a_token_without_typ_but_never_another_typ(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    """Libraries such as `jose` omit `typ`; a project may accept that, never a wrong one."""

    def lenient(config: dict[str, Any]) -> None:
        config["projects"]["app"]["require_typ"] = False

    gateway = await make_gateway(lenient)
    payload = json.dumps(tokens.claims()).encode()
    without_typ = sign_raw(b'{"alg":"RS256","kid":"key-a"}', payload, tokens.key)
    status, _, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": without_typ})
    assert status == 200
    wrong = tokens.mint(tokens.claims(), headers={"typ": "at+jwt"})
    status, body, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": wrong})
    assert (status, body["error"]["reason"]) == (401, "typ_invalid")


async def test_token_over_max_bytes_is_rejected(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    gateway = await make_gateway(limits={"max_token_bytes": 512})
    token = tokens.good(user="u" * 600)
    status, body, _ = await post(http, gateway, ANONYMOUS, {"X-Sdk-Auth-Token": token})
    assert status == 401
    assert body["error"]["reason"] == "token_too_large"


async def test_two_different_tokens_are_rejected(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    status, body, _ = await post(
        http,
        gateway,
        identified(),
        {"X-Sdk-Auth-Token": tokens.good(), "Authorization": f"Bearer {tokens.good('bob')}"},
    )
    assert status == 401
    assert body["error"]["code"] == "TOKEN_REJECTED"
    assert body["error"]["reason"] == "token_duplicate"


async def test_kid_less_token_tries_each_compatible_key(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens, key_b: Any
) -> None:
    def two_keys(config: dict[str, Any]) -> None:
        config["projects"]["app"]["keys"].insert(0, {"id": "key-b", "pem_file": "keys/b.pem"})

    gateway = await make_gateway(two_keys)
    token = tokens.mint(tokens.claims(), headers={"kid": None})
    status, _, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 200


async def test_audience_and_issuer_are_enforced_when_configured(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    def scoped(config: dict[str, Any]) -> None:
        config["projects"]["app"].update(audience="tracking", issuer="https://backend")

    gateway = await make_gateway(scoped)
    good = tokens.good(aud=["other", "tracking"], iss="https://backend")
    wrong_aud = tokens.good(aud="other", iss="https://backend")
    wrong_iss = tokens.good(aud="tracking", iss="https://elsewhere")
    assert (await post(http, gateway, identified(), {"X-Sdk-Auth-Token": good}))[0] == 200
    for token, reason in ((wrong_aud, "audience_invalid"), (wrong_iss, "issuer_invalid")):
        status, body, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
        assert (status, body["error"]["reason"]) == (401, reason)


async def test_max_token_lifetime(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, tokens: Tokens
) -> None:
    def short_lived(config: dict[str, Any]) -> None:
        config["projects"]["app"]["max_token_lifetime_seconds"] = 600

    gateway = await make_gateway(short_lived)
    long_lived = tokens.mint(tokens.claims(ttl=7200))
    status, body, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": long_lived})
    assert (status, body["error"]["reason"]) == (401, "lifetime_too_long")
    ok = tokens.mint(tokens.claims(ttl=600))
    assert (await post(http, gateway, identified(), {"X-Sdk-Auth-Token": ok}))[0] == 200


async def test_about_to_expire_warning(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    token = tokens.mint(tokens.claims(ttl=200))
    status, _, headers = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token})
    assert status == 200
    assert headers["X-Auth-Warning"] == "TOKEN_ABOUT_TO_EXPIRE"
    assert headers["X-Auth-Token-Expires-In"] == "200"


async def test_rs512_is_accepted_when_allowed(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    token = tokens.mint(tokens.claims(), alg="RS512")
    assert (await post(http, gateway, identified(), {"X-Sdk-Auth-Token": token}))[0] == 200


async def test_authenticated_user_is_percent_encoded(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    user = "zoë 100%"
    status, _, _ = await post(
        http, gateway, identified(user), {"X-Sdk-Auth-Token": tokens.good(user)}
    )
    assert status == 200
    assert upstream.last_headers()["x-authenticated-user"] == "zo%C3%AB 100%25"


async def test_spoofed_auth_headers_are_removed(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    status, _, _ = await post(
        http,
        gateway,
        ANONYMOUS,
        {"X-Authenticated-User": "admin", "x_auth_status": "verified", "X-AUTH_STATUS": "x"},
    )
    assert status == 200
    forwarded = upstream.received[-1].headers
    names = [k.lower().replace("_", "-") for k, _ in forwarded]
    assert names.count("x-auth-status") == 1
    assert "x-authenticated-user" not in names
    assert upstream.last_headers()["x-auth-status"] == "anonymous"


# --- modes -------------------------------------------------------------------------------------


async def test_monitor_forwards_would_reject_as_unverified(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    def monitor(config: dict[str, Any]) -> None:
        config["projects"]["app"]["mode"] = "monitor"

    gateway = await make_gateway(monitor)
    status, _, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": tokens.expired()})
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "unverified"
    status, _, _ = await post(http, gateway, identified(), {"X-Sdk-Auth-Token": tokens.good()})
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "verified"
    # 400-class identity problems are would_reject too, and forwarded unchanged.
    conflicting = {"customer_ids": {"registered": "alice"}}
    status, _, _ = await post(http, gateway, conflicting, {"X-User-Id": "bob"})
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "unverified"
    decisions = [line["decision"] for line in await gateway.access_log(3)]
    assert decisions == ["would_reject", "verified", "would_reject"]
    assert gateway.log_lines[0]["code"] == "TOKEN_EXPIRED"
    assert gateway.log_lines[2]["reason"] == "identity_conflict"


async def test_disabled_parses_nothing(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    def disabled(config: dict[str, Any]) -> None:
        config["projects"]["app"]["mode"] = "disabled"

    gateway = await make_gateway(disabled)
    broken = b'{"customer_ids": {"registered": "a", "registered": "b"'
    status, _, _ = await post(http, gateway, broken, {"X-Sdk-Auth-Token": "garbage"})
    assert status == 200
    assert upstream.received[-1].body == broken.decode()
    assert upstream.last_headers()["x-auth-status"] == "disabled"


async def test_unlisted_project_uses_defaults(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    status, _, _ = await post(
        http, gateway, identified(), path="/track/v2/projects/unknown/customers/events"
    )
    assert status == 200
    assert upstream.last_headers()["x-auth-status"] == "disabled"


async def test_project_ids_match_case_insensitively(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    path = "/track/v2/projects/APP/customers/events"
    status, body, _ = await post(http, gateway, identified(), path=path)
    assert status == 401
    assert body["error"]["code"] == "TOKEN_NOT_PROVIDED"


async def test_batch_identities_must_agree(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    path = "/track/v2/projects/app/batch"

    def command(user: str | None) -> dict[str, Any]:
        ids = {"registered": user} if user else {"cookie": "c"}
        return {"name": "customers/events", "data": {"customer_ids": ids}}

    agreed = {"commands": [command("alice"), command(None), command("alice")]}
    headers = {"X-Sdk-Auth-Token": tokens.good()}
    assert (await post(http, gateway, agreed, headers, path=path))[0] == 200
    smuggled = {"commands": [command("alice"), command("bob")]}
    status, body, _ = await post(http, gateway, smuggled, headers, path=path)
    assert (status, body["error"]["reason"]) == (400, "identity_conflict")
    not_array = {"commands": {"0": command("bob")}}
    status, body, _ = await post(http, gateway, not_array, headers, path=path)
    assert (status, body["error"]["reason"]) == (400, "identity_path_not_array")


async def test_route_without_auth_passes(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    async with http.get(gateway.url + "/v2/sdkconfig", headers={"X-App-Id": "app"}) as response:
        assert response.status == 200
    async with http.get(gateway.url + "/v2/sdkconfig") as response:
        assert response.status == 400
        assert (await response.json())["error"]["reason"] == "project_header_missing"
