"""The trust boundary against readers the gateway does not control: each test sends what one
real upstream stack reads differently from a naive proxy, and checks the gateway's answer and
what reached the upstream.

- Go's encoding/json matches object keys under Unicode case folding (`regi\u017ftered` with a
  long s is `registered`; the Kelvin sign is `k`);
- cJSON reads a key up to its first NUL;
- Django strips a non-breaking space in front of a media type and parses a form;
- a server that does not read a GET's body takes it for the next request on the connection;
- ASP.NET reads query names in any case, PHP reads `user.id` as `user_id`, and Node's `qs`
  reads `user_id[]=bob` as `user_id`;
- frameworks believe client-address headers (`X-Real-IP` and friends).

`tests/test_differential.py` runs such requests through the gateway into the real parsers.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tests.conftest import (
    NOW,
    GatewayFactory,
    KeyPair,
    RunningGateway,
    Tokens,
    Upstream,
    base_config,
    free_port,
    gateway_process,
    raw_request,
    write_config,
)
from tests.test_hostile import Answer, assert_bad_request, assert_refused, post, raw_http
from tests.test_jwks import rsa_jwk

EVENTS = "/track/v2/projects/app/customers/events"
BATCH = "/track/v2/projects/app/batch"
LONG_S = "\u017f"  # LATIN SMALL LETTER LONG S: casefold() is "s"
KELVIN = "\u212a"  # KELVIN SIGN: casefold() is "k"


def body(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def batch_of(*customer_ids: dict[str, Any]) -> bytes:
    return body({"commands": [{"data": {"customer_ids": ids}} for ids in customer_ids]})


# --- B1: keys equal under Unicode case folding -------------------------------------------------


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(
            {"customer_ids": {"registered": "alice", f"regi{LONG_S}tered": "bob"}}, id="long_s"
        ),
        pytest.param(
            {"customer_ids": {"registered": "alice", "REGISTERED": "bob"}}, id="upper_case"
        ),
        pytest.param(
            {"customer_ids": {"registered": "alice"}, f"CU{LONG_S}TOMER_IDS": {"registered": "x"}},
            id="long_s_in_parent",
        ),
    ],
)
async def test_a_key_equal_to_ours_under_case_folding_beside_it_is_refused(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    document: dict[str, Any],
) -> None:
    answer = await post(http, gateway, body(document), {"X-Sdk-Auth-Token": tokens.good()})
    assert_bad_request(answer, "case_variant_key")
    assert upstream.received == []


async def test_a_lone_case_folded_variant_is_refused_not_anonymous(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    """Without a token this was forwarded as anonymous, and Go read it as bob."""
    answer = await post(http, gateway, body({"customer_ids": {f"regi{LONG_S}tered": "bob"}}))
    assert_bad_request(answer, "case_variant_key")
    assert upstream.received == []


async def test_the_kelvin_sign_inside_batch_elements_is_refused(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    def key_in_path(config: dict[str, Any]) -> None:
        config["routes"][1]["identity"] = [{"json": "commands[*].data.customer_ids.kid"}]

    gateway = await make_gateway(key_in_path)
    document = batch_of({"kid": "alice"}, {"kid": "alice", f"{KELVIN}id": "bob"})
    answer = await post(http, gateway, document, {"X-Sdk-Auth-Token": tokens.good()}, path=BATCH)
    assert_bad_request(answer, "case_variant_key")
    assert upstream.received == []


async def test_two_ids_of_an_id_map_equal_under_case_folding_are_refused(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    def id_map(config: dict[str, Any]) -> None:
        config["projects"]["app"]["subject"] = {"claim": "sub", "format": "id_map"}
        config["identity"] = [{"json": "customer_ids"}]

    gateway = await make_gateway(id_map)
    token = tokens.mint(tokens.claims(sub={"registered": "alice", "email": "a@example.com"}))
    document = {"customer_ids": {"registered": "alice", "email": "a@example.com", "EMAIL": "b"}}
    answer = await post(http, gateway, body(document), {"X-Sdk-Auth-Token": token})
    assert_bad_request(answer, "case_variant_key")
    assert upstream.received == []


# --- B2: control characters in keys ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b'{"customer_ids":{"registered\\u0000":"bob","registered":"alice"}}', id="nul_suffix"
        ),
        pytest.param(b'{"customer_ids":{"registered":"alice"},"x\\u001f":1}', id="unit_separator"),
        pytest.param(b'{"customer_ids":{"registered":"alice"},"x\x7f":1}', id="raw_delete"),
        pytest.param(b'{"customer_ids":{"registered":"alice","\\n":1}}', id="newline_key"),
    ],
)
async def test_a_key_holding_a_control_character_anywhere_is_refused(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    raw: bytes,
) -> None:
    answer = await post(http, gateway, raw, {"X-Sdk-Auth-Token": tokens.good()})
    assert_bad_request(answer, "key_control_character")
    assert upstream.received == []


async def test_control_characters_in_values_elsewhere_are_forwarded(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    raw = b'{"customer_ids":{"registered":"alice"},"properties":{"note":"a\\u0000b"}}'
    answer = await post(http, gateway, raw, {"X-Sdk-Auth-Token": tokens.good()})
    assert answer.status == 200
    assert upstream.received[-1].body == raw.decode()


# --- B3: Content-Type by RFC 9110's grammar ----------------------------------------------------

SMUGGLED_FORM = b'{"customer_ids":{"registered":"alice"},"x":"&registered=bob&"}'


@pytest.mark.parametrize(
    ("content_type", "reason"),
    [
        pytest.param(b"\xa0application/x-www-form-urlencoded", "media_type_invalid", id="nbsp"),
        pytest.param(b"\x85application/x-www-form-urlencoded", "media_type_invalid", id="nel"),
        pytest.param(b"application/json\xa0", "media_type_invalid", id="nbsp_after"),
        pytest.param(b"application /json", "media_type_invalid", id="space_in_type"),
        pytest.param(b"application/json, text/plain", "media_type_invalid", id="list"),
        pytest.param(
            b"application/json; charset=utf-8; charset=latin1",
            "media_type_invalid",
            id="two_charsets",
        ),
        pytest.param(
            b"application/x-www-form-urlencoded; charset=utf-8",
            "media_type_unsupported",
            id="form",
        ),
        pytest.param(b"MULTIPART/form-data; boundary=x", "media_type_unsupported", id="multipart"),
        pytest.param(b"application/json; charset=utf-16", "charset_unsupported", id="utf16"),
    ],
)
async def test_a_media_type_outside_the_grammar_or_a_form_is_415(
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    content_type: bytes,
    reason: str,
) -> None:
    head = (
        f"POST {EVENTS} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sdk-Auth-Token: {tokens.good()}\r\n"
        f"Content-Length: {len(SMUGGLED_FORM)}\r\n"
    ).encode()
    answer = await raw_request(
        gateway.port, head + b"Content-Type: " + content_type + b"\r\n\r\n" + SMUGGLED_FORM
    )
    assert_refused(answer, 415, "UNSUPPORTED_MEDIA_TYPE", reason)
    assert upstream.received == []


async def test_a_415_says_what_it_received_and_what_the_route_reads(
    http: aiohttp.ClientSession, gateway: RunningGateway, tokens: Tokens
) -> None:
    form = "application/x-www-form-urlencoded; charset=utf-8"
    answer = await post(http, gateway, b"registered=bob", content_type=form)
    assert answer.status == 415
    assert answer.json()["error"]["message"] == (
        "Media type application/x-www-form-urlencoded; this route reads JSON."
    )
    answer = await post(http, gateway, b"{}", content_type="text/plain; charset=latin1")
    assert answer.json()["error"]["message"] == (
        "A charset other than UTF-8; this route reads UTF-8 JSON."
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json;charset=UTF-8",
        'application/json; charset="utf-8"',
        "application/vnd.api+json ; version=2",
        "text/plain",
    ],
)
async def test_well_formed_json_and_text_media_types_pass(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    content_type: str,
) -> None:
    document = body({"customer_ids": {"registered": "alice"}})
    headers = {"X-Sdk-Auth-Token": tokens.good()}
    answer = await post(http, gateway, document, headers, content_type=content_type)
    assert answer.status == 200
    assert upstream.last_headers()["x-auth-status"] == "verified"


# --- B4: no bodies on methods whose bodies servers do not read ---------------------------------

SMUGGLED_REQUEST = (
    b"POST /track/v2/projects/app/customers/events HTTP/1.1\r\nHost: up\r\n"
    b"X-Auth-Status: verified\r\nX-Authenticated-User: bob\r\nContent-Length: 2\r\n\r\n{}"
)


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS", "TRACE"])
async def test_a_body_on_a_bodyless_method_is_refused_and_the_connection_closed(
    gateway: RunningGateway, upstream: Upstream, method: str
) -> None:
    request = raw_http(
        "/v2/sdkconfig", [("X-App-Id", "app")], SMUGGLED_REQUEST, method=method
    ) + raw_http("/v2/sdkconfig", [("X-App-Id", "app")], method="GET")
    answer = await raw_request(gateway.port, request)
    if method == "HEAD":  # the answer has no body to read the reason from
        assert answer.status == 400
    else:
        assert_refused(answer, 400, "BAD_REQUEST", "body_not_allowed")
    assert answer.headers["connection"] == "close"
    assert upstream.received == []


async def test_a_chunked_body_on_get_is_refused(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED_REQUEST), SMUGGLED_REQUEST)
    request = raw_http(
        "/v2/sdkconfig",
        [("X-App-Id", "app"), ("Transfer-Encoding", "chunked")],
        framed,
        method="GET",
        content_length=False,
    )
    answer = await raw_request(gateway.port, request)
    assert_refused(answer, 400, "BAD_REQUEST", "body_not_allowed")
    assert upstream.received == []


async def test_get_with_an_empty_length_is_forwarded(
    gateway: RunningGateway, upstream: Upstream
) -> None:
    request = raw_http("/v2/sdkconfig", [("X-App-Id", "app"), ("Connection", "close")], b"")
    answer = await raw_request(gateway.port, request.replace(b"POST", b"GET", 1))
    assert answer.status == 200
    assert [r.method for r in upstream.received] == ["GET"]


# --- JSON null is absent -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "document"),
    [
        pytest.param(EVENTS, {"customer_ids": {"registered": None}}, id="value"),
        pytest.param(EVENTS, {"customer_ids": None}, id="parent"),
        pytest.param(
            BATCH, {"commands": [{"data": {"customer_ids": {"registered": None}}}]}, id="batch"
        ),
        pytest.param(BATCH, {"commands": [None]}, id="batch_element"),
    ],
)
async def test_a_json_null_identity_is_anonymous(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    upstream: Upstream,
    path: str,
    document: dict[str, Any],
) -> None:
    """Segment's and RudderStack's SDKs send `"userId": null` for anonymous events."""
    answer = await post(http, gateway, body(document), path=path)
    assert answer.status == 200
    assert upstream.last_headers()["x-auth-status"] == "anonymous"


async def test_a_null_beside_a_user_in_a_batch_is_that_user(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    document = batch_of({"registered": "alice"}, {"registered": None})
    answer = await post(http, gateway, document, {"X-Sdk-Auth-Token": tokens.good()}, path=BATCH)
    assert answer.status == 200
    assert upstream.last_headers()["x-authenticated-user"] == "alice"


# --- query names as lenient upstreams read them ------------------------------------------------


@pytest.fixture
async def query_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    def from_query(config: dict[str, Any]) -> None:
        config["routes"][0]["identity"] = [{"query": "user_id"}]

    return await make_gateway(from_query)


async def identify_by_query(
    http: aiohttp.ClientSession, gateway: RunningGateway, query: str, token: str | None
) -> Answer:
    headers = {"X-Sdk-Auth-Token": token} if token else {}
    return await post(http, gateway, b"{}", headers, path=f"{EVENTS}?{query}")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        pytest.param("user_id=alice&USER_ID=bob", "query_duplicate", id="upper_case"),
        pytest.param("user_id=alice&u%C5%BFer_id=bob", "query_duplicate", id="long_s"),
        pytest.param("user_id=alice&user.id=bob", "query_duplicate", id="php_dot"),
        pytest.param("user_id=alice&user+id=bob", "query_duplicate", id="php_space"),
        pytest.param("user_id=alice&user%5Fid=bob", "query_duplicate", id="percent_encoded"),
        pytest.param("user_id%5B%5D=bob", "query_invalid", id="qs_array"),
        pytest.param("user_id%5B0%5D=bob&user_id=alice", "query_invalid", id="qs_index"),
        pytest.param("user_id=alice&user_id%00=bob", "query_invalid", id="nul_in_name"),
    ],
)
async def test_query_names_an_upstream_merges_are_one_parameter(
    http: aiohttp.ClientSession,
    query_gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    query: str,
    reason: str,
) -> None:
    answer = await identify_by_query(http, query_gateway, query, tokens.good())
    assert_bad_request(answer, reason)
    assert upstream.received == []


async def test_a_lone_variant_query_name_identifies_its_user(
    http: aiohttp.ClientSession, query_gateway: RunningGateway, upstream: Upstream, tokens: Tokens
) -> None:
    """`USER_ID=bob` is bob to an ASP.NET upstream: bob's token is needed, alice's refused."""
    refused = await identify_by_query(http, query_gateway, "USER_ID=bob", tokens.good("alice"))
    assert_refused(refused, 401, "TOKEN_REJECTED", "subject_mismatch")
    missing = await identify_by_query(http, query_gateway, "USER_ID=bob", None)
    assert_refused(missing, 401, "TOKEN_NOT_PROVIDED", "token_missing")
    assert (
        await identify_by_query(http, query_gateway, "USER_ID=bob", tokens.good("bob"))
    ).status == 200
    assert upstream.last_headers()["x-authenticated-user"] == "bob"


async def test_a_query_token_is_stripped_in_every_spelling(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    def token_in_query(config: dict[str, Any]) -> None:
        config["routes"][0]["token"] = [{"query": "sdk_token"}]

    gateway = await make_gateway(token_in_query)
    document = body({"customer_ids": {"registered": "alice"}})
    path = f"{EVENTS}?SDK_TOKEN={tokens.good()}&keep=1"
    answer = await post(http, gateway, document, path=path)
    assert answer.status == 200
    assert upstream.received[-1].path_qs == f"{EVENTS}?keep=1"


# --- client-address headers --------------------------------------------------------------------

CLIENT_ADDRESS_HEADERS = {
    "X-Real-IP": "203.0.113.7",
    "True-Client-IP": "203.0.113.7",
    "X-Client-IP": "203.0.113.7",
    "CF-Connecting-IP": "203.0.113.7",
    "Forwarded": "for=203.0.113.7",
    "X_Real_IP": "203.0.113.7",
}


async def test_client_address_headers_from_an_untrusted_client_are_dropped(
    http: aiohttp.ClientSession, gateway: RunningGateway, upstream: Upstream
) -> None:
    answer = await post(http, gateway, b"{}", CLIENT_ADDRESS_HEADERS)
    assert answer.status == 200
    received = {k.lower().replace("_", "-") for k in upstream.last_headers()}
    assert received.isdisjoint(k.lower().replace("_", "-") for k in CLIENT_ADDRESS_HEADERS)
    assert upstream.last_headers()["x-forwarded-for"] == "127.0.0.1"


async def test_client_address_headers_from_a_trusted_proxy_are_kept(
    http: aiohttp.ClientSession, make_gateway: GatewayFactory, upstream: Upstream
) -> None:
    gateway = await make_gateway(trusted_proxies=["127.0.0.0/8"])
    headers = {k: v for k, v in CLIENT_ADDRESS_HEADERS.items() if "_" not in k}
    answer = await post(http, gateway, b"{}", headers)
    assert answer.status == 200
    for name, value in headers.items():
        assert upstream.last_headers()[name.lower()] == value


# --- JWK key_ops -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param({"key_ops": ["encrypt"]}, id="key_ops_encrypt"),
        pytest.param({"key_ops": ["sign"]}, id="key_ops_sign_only"),
        pytest.param({"use": "enc"}, id="use_enc"),
    ],
)
async def test_a_jwk_not_for_verification_verifies_nothing(
    http: aiohttp.ClientSession,
    make_gateway: GatewayFactory,
    tmp_path: Path,
    key_a: KeyPair,
    key_b: KeyPair,
    upstream: Upstream,
    usage: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_for_signatures = {**rsa_jwk(key_b.private, "enc-key"), **usage}
    not_for_signatures.pop("use") if "use" not in usage else None
    document = {"keys": [rsa_jwk(key_a.private, "sig-key"), not_for_signatures]}
    (tmp_path / "keys").mkdir(exist_ok=True)
    (tmp_path / "keys" / "app.jwks.json").write_text(json.dumps(document))

    def from_file(config: dict[str, Any]) -> None:
        config["projects"]["app"].update(keys=[], jwks_file="keys/app.jwks.json")

    gateway = await make_gateway(from_file)
    assert any("not for verifying" in r.getMessage() for r in caplog.records)
    document_body = body({"customer_ids": {"registered": "alice"}})
    for private, kid, status in ((key_a, "sig-key", 200), (key_b, "enc-key", 401)):
        claims = {"sub": {"key": "uid", "value": "alice"}, "exp": int(NOW) + 600}
        token = jwt.encode(claims, private.private, algorithm="RS256", headers={"kid": kid})
        answer = await post(http, gateway, document_body, {"X-Sdk-Auth-Token": token})
        assert answer.status == status, answer.body
    assert re.fullmatch(r"kid_unknown", answer.json()["error"]["reason"])
    assert len(upstream.received) == 1


# --- D4: no request within the default limits holds the event loop long --------------------------


def worst_case_bodies() -> dict[str, bytes]:
    """The most expensive JSON per byte to read for identity that the default limits admit:
    a batch of minimal elements, tiny objects, escaped keys, empty arrays, and empty objects
    for the strict decoder (300 ms a MiB: read on a worker thread)."""
    size = 1 << 20
    element = '{"data":{"customer_ids":{"registered":"alice"}}}'
    escaped = '{"data":{"customer_ids":{"regi\\u0073tered":"alice"}}}'
    return {
        "small_batch": ('{"commands":[' + ",".join([element] * 10) + "]}").encode(),  # warm-up
        "batch": ('{"commands":[' + ",".join([element] * (size // 51)) + "]}").encode(),
        "escaped_batch": ('{"commands":[' + ",".join([escaped] * (size // 57)) + "]}").encode(),
        "tiny_objects": ('{"commands":[' + ",".join(['{"a":1}'] * (size // 8)) + "]}").encode(),
        "empty_arrays": ('{"commands":[' + ",".join(["[]"] * (size // 3)) + "]}").encode(),
        # a control character in a string sends the document to the strict decoder
        "strict_decoder": (
            '{"commands":[' + ",".join(["{}"] * (size // 3)) + '],"n":"\\n"}'
        ).encode(),
        "inflating_gzip": b"",  # filled below: ~30 KB that inflate past the default limit
    }


async def test_no_body_within_the_default_limits_holds_the_loop_long(
    tmp_path: Path, key_a: KeyPair, upstream: Upstream
) -> None:
    """A 21 KB gzip body inflating to 7.3 MB of batch JSON held the loop ~350 ms under the old
    8 MiB decompression default. A real `gateway run` reads each worst-case body while a probe
    on another connection asks it for something it answers itself, one request after another:
    the probe's slowest answer bounds how long the body held the event loop."""
    bodies = worst_case_bodies()
    element = '{"data":{"customer_ids":{"registered":"alice"}}}'
    bodies["inflating_gzip"] = gzip.compress(
        ('{"commands":[' + ",".join([element] * 150_000) + "]}").encode(), 9
    )
    config = base_config(upstream.url)
    config.update(listen=f"127.0.0.1:{free_port()}", admin_listen=f"127.0.0.1:{free_port()}")
    path = write_config(tmp_path, config, {"a.pem": key_a})
    port = int(config["listen"].rpartition(":")[2])
    holds: dict[str, float] = {}
    async with (
        gateway_process(path, config["admin_listen"]),
        aiohttp.ClientSession() as probe,
    ):
        probe_url = f"http://127.0.0.1:{port}/no-such-route"
        for name, data in bodies.items():
            headers = [("Content-Type", "application/json")]
            if name == "inflating_gzip":
                headers.append(("Content-Encoding", "gzip"))
            hostile = asyncio.ensure_future(
                raw_request(port, raw_http(BATCH, headers, data), wait_seconds=20)
            )
            slowest = 0.0
            while not hostile.done():
                started = time.perf_counter()
                async with probe.get(probe_url) as response:
                    await response.read()
                slowest = max(slowest, time.perf_counter() - started)
            answer = await hostile
            assert answer.status in (400, 401, 413), (name, answer.status)
            holds[name] = slowest
    # ~50 ms on an idle core; the bound leaves room for a loaded CI machine, and the old
    # default failed it by far (the gzip body alone held the loop 350-700 ms).
    assert max(holds.values()) < 0.2, holds
    print({name: f"{hold * 1000:.0f} ms" for name, hold in holds.items()})
