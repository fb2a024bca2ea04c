"""The hot path's optimisations, each pinned by a test that fails if the shortcut is wrong.

- `loads_strict` reads most documents with orjson (which keeps the last of two duplicate keys)
  and counts colons to prove no member was dropped; backslashes and long digit runs take the
  strict decoder. Tested directly, against `json.loads` and an independent strict oracle.
- Request header names are read normalised everywhere (`header_key`: lower case, `_` as `-`),
  so `Content_Encoding` and `X_Request_Id` mean what `Content-Encoding` and `X-Request-Id` do.
- RS256/384/512 signatures are checked by encoding the expected PKCS#1 v1.5 block's DigestInfo
  and comparing, after OpenSSL's raw public-key operation, instead of through its `verify`:
  every forged block is held to OpenSSL's own `RSA_verify` verdict.
- Upstream answer heads are parsed once per distinct head bytes; a HEAD answer's framing
  depends on the method, and hop-by-hop fields, the request id and `Date` must come out right on
  the cached path as on the first.

Everything end to end runs through the real gateway on loopback; the upstreams that must send
exact bytes are asyncio servers written here (they keep the connection alive, so a framing
mistake shows up on the next answer rather than being hidden by a fresh connection).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import gzip
import hashlib
import itertools
import json
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth.algorithms import ALGORITHMS
from gateway.auth.extract import _IDENTITY_TEXT, is_identity_text, walk_json
from gateway.auth.jsonstrict import JSONRejected, loads_strict
from gateway.auth.verified import VerifiedToken, token_user, verified_token
from gateway.auth.verify import (
    TokenCache,
    _b64decode,
    _compact_segments,
    cache_key,
    cache_salt,
    token_digest,
)
from gateway.base.memo import BoundedMemo
from gateway.http.messages import header_key
from gateway.refusals.reasons import Reason, Rejected
from tests.conftest import GatewayFactory, Tokens, Upstream, raw_request

EVENTS = "/track/v2/projects/app/customers/events"
BATCH = "/track/v2/projects/app/batch"
SDK_CONFIG = "/v2/sdkconfig"
ANONYMOUS = b'{"customer_ids": {"cookie": "c-1"}}'


def normalised(name: str) -> str:
    return name.lower().replace("_", "-")


def post(path: str, lines: list[str], body: bytes) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    head += [*lines, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# === loads_strict ================================================================================


def strict_oracle(data: bytes) -> tuple[str, Any]:
    """An independent strict reading: ("ok", value) or ("rejected", whether for a duplicate)."""

    class Duplicate(Exception):
        pass

    def pairs(members: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in members}) != len(members):
            raise Duplicate
        return dict(members)

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value

    def constant(name: str) -> Any:
        raise ValueError(name)

    try:
        text = data.decode("utf-8")
        if text.startswith("\ufeff"):
            return ("rejected", False)
        value = json.loads(
            text, object_pairs_hook=pairs, parse_float=finite, parse_constant=constant
        )
    except Duplicate:
        return ("rejected", True)
    except (ValueError, RecursionError):
        return ("rejected", False)
    return ("ok", value)


def outcome(data: bytes) -> tuple[str, Any]:
    try:
        return ("ok", loads_strict(data))
    except JSONRejected as refused:
        return ("rejected", refused.duplicate_key)


def same_value(got: Any, expected: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, True is not 1)."""
    return repr(got) == repr(expected)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"a":1,"a":2}', id="plain"),
        pytest.param(b'{"a" : 1 , "a" : 2}', id="whitespace_around_colons"),
        pytest.param(b'{"a":"x:y","a":"z"}', id="dropped_value_has_a_colon"),
        pytest.param(b'{"a":"z","a":"x:y"}', id="surviving_value_has_a_colon"),
        pytest.param(b'{"a":"::::","a":"z","b":"::"}', id="dropped_value_all_colons"),
        pytest.param(b'{"a":"http://h:1/p","a":"http://h:2/p"}', id="urls"),
        pytest.param(b'{"a:b":1,"a:b":2}', id="key_has_a_colon"),
        pytest.param(b'{":":":",":":":"}', id="key_and_value_are_colons"),
        pytest.param(b'{"a":"x","a":"y\\u003a"}', id="surviving_escaped_colon_slow_path"),
        pytest.param(b'{"a":"x\\u003a","a":"y"}', id="dropped_escaped_colon_slow_path"),
        pytest.param(b'{"a:b":1,"a\\u003ab":2}', id="same_key_one_escaped"),
        pytest.param(b'{"\\u0061":1,"a":2}', id="same_key_spelled_two_ways"),
        pytest.param(b'[{"a":1},{"b":2,"b":3}]', id="in_array_of_objects"),
        pytest.param(b'{"x":[{"id":"u:1","id":"u:2"}]}', id="in_array_with_colons"),
        pytest.param(b'[[[{"k":[{"k":1,"k":"v:w"}]}]]]', id="deep_in_arrays"),
        pytest.param(b'{"o":{"i":{"k":"a:b","k":"c"}}}', id="depth_three"),
        pytest.param(b'{"a":{"b":1},"a":{"b":1}}', id="identical_objects"),
        pytest.param(b'{"a":null,"a":null}', id="identical_nulls"),
        pytest.param('{"é:ü":1,"é:ü":2}'.encode(), id="unicode_key_with_colon"),
        pytest.param(b'{"n":12345678901234567890,"n":1}', id="with_long_int_slow_path"),
        pytest.param(b'{"": 1, "": 2}', id="empty_key"),
        pytest.param(
            b'{"customer_ids":{"registered":"alice","registered":"alice:x"}}',
            id="identity_then_impostor",
        ),
        pytest.param(b"[" * 250 + b'{"a":1,"a":2}' + b"]" * 250, id="under_250_arrays"),
    ],
)
def test_duplicate_keys_are_refused(data: bytes) -> None:
    with pytest.raises(JSONRejected) as refused:
        loads_strict(data)
    assert refused.value.duplicate_key is True


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"a":1}', id="one_member"),
        pytest.param(b'{"a" : 1}', id="spaces_around_colon"),
        pytest.param(b' \n\t{ "a" :\r\n 1 , "b":2 } \n', id="all_json_whitespace"),
        pytest.param(b'{"a:b":"c:d","e":"::"}', id="colons_in_keys_and_values"),
        pytest.param(b'{"url":"https://u:p@h:8443/a:b?c=d:e#f:g"}', id="url"),
        pytest.param(b'{"a":[{"a":1},{"a":2}],"b":{"a":{"a":[]}}}', id="same_key_other_objects"),
        pytest.param(b'{"a":1,"A":2}', id="keys_differing_in_case"),
        pytest.param('{"名前":"Zoë: ünïcödé ☃","k":"😀"}'.encode(), id="unicode_unescaped"),
        pytest.param(b"[1.5,-0.25,1e10,-2.5E-3,0.1,5e-324,1.7976931348623157e308]", id="floats"),
        pytest.param(b"[-1,-0,0,-0.0,-999999999999999999]", id="negatives"),
        pytest.param(b'{"t":true,"f":false,"n":null}', id="literals"),
        pytest.param(b'"a:b"', id="top_level_string"),
        pytest.param(b"[]", id="empty_array"),
        pytest.param(b"{}", id="empty_object"),
        pytest.param(b'{"a":"x","b":"y\\u003a","c":"\\"q\\""}', id="escapes_slow_path"),
        pytest.param(b'{"\\u0061":1,"b":2}', id="escaped_key_no_duplicate"),
    ],
)
def test_documents_without_duplicates_read_as_json_loads(data: bytes) -> None:
    assert same_value(loads_strict(data), json.loads(data))


@pytest.mark.parametrize(
    "data",
    [
        b"123456789012345678",  # 18 digits: the fast path
        b"-123456789012345678",
        b"999999999999999999",
        b"1234567890123456789",  # 19 digits: the strict decoder
        b"9223372036854775807",
        b"9223372036854775808",
        b"-9223372036854775809",
        b"18446744073709551615",
        b"18446744073709551616",
        b"12345678901234567890123",
        b"-12345678901234567890123",
        b'{"a":{"b":[12345678901234567890123,18446744073709551616]},"c":"x:y"}',
        b'[{"id":123456789012345678},{"id":-9223372036854775809}]',
    ],
)
def test_long_integers_stay_exact(data: bytes) -> None:
    got, expected = loads_strict(data), json.loads(data)
    assert same_value(got, expected)

    def ints(value: Any) -> list[Any]:
        if isinstance(value, dict):
            return [i for v in value.values() for i in ints(v)]
        if isinstance(value, list):
            return [i for v in value for i in ints(v)]
        return [value] if isinstance(value, int | float) else []

    assert all(type(i) is int for i in ints(got)), got


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"1e400", id="overflow"),
        pytest.param(b"[-1e400]", id="negative_overflow"),
        pytest.param(b'{"a":{"b":1E999}}', id="nested_overflow"),
        pytest.param(b'{"a":"\\n","b":1e400}', id="overflow_slow_path"),
        pytest.param(b"[12345678901234567890,1e400]", id="overflow_with_long_int"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b'{"a":NaN}', id="nan_member"),
        pytest.param(b"[Infinity]", id="infinity"),
        pytest.param(b"-Infinity", id="minus_infinity"),
        pytest.param(b'\xef\xbb\xbf{"a":1}', id="bom"),
        pytest.param(b'{"a":"\xff"}', id="invalid_utf8"),
        pytest.param(b'{"a":"\xc0\x80"}', id="overlong_utf8"),
        pytest.param(b'"\xed\xa0\x80"', id="encoded_surrogate"),
        pytest.param(b'{"a":1} x', id="trailing_garbage"),
        pytest.param(b'{"a":1}{"a":2}', id="two_documents"),
        pytest.param(b'{"a":1}\x00', id="trailing_nul"),
        pytest.param(b"[1]]", id="extra_bracket"),
        pytest.param(b'{"a":1,}', id="trailing_comma"),
        pytest.param(b'{"a":"x\x01y"}', id="raw_control_character"),
        pytest.param(b"", id="empty"),
        pytest.param(b"1" * 5000, id="int_past_pythons_digit_limit"),
    ],
)
def test_non_json_and_non_finite_are_refused_not_as_duplicates(data: bytes) -> None:
    with pytest.raises(JSONRejected) as refused:
        loads_strict(data)
    assert refused.value.duplicate_key is False


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * 300 + b"]" * 300, id="300_arrays"),
        pytest.param(b'{"a":' * 300 + b"1" + b"}" * 300, id="300_objects"),
        pytest.param(b'[{"k":"a:b","v":' * 150 + b"0" + b"}]" * 150, id="300_mixed_with_colons"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="5000_arrays"),
    ],
)
def test_deep_nesting_parses_as_json_loads_or_is_refused(data: bytes) -> None:
    kind, value = outcome(data)
    if kind == "ok":
        assert value == json.loads(data)
    else:
        assert value is False  # refused, and not as a duplicate


# Raw JSON text pieces, chosen to meet the shortcut's edges: colons in keys and values,
# escapes (the strict decoder), runs of 18 and 19+ digits, keys that collide once decoded.
_KEYS = st.sampled_from(["a", "b", "a:b", ":", "é", "http://h:1", "\\u003a", "a\\u003ab", ""])
_SCALARS = st.one_of(
    st.sampled_from(
        [
            "0", "-0", "1.5", "-2.5e-3", "1E5", "true", "false", "null", '"x:y"', '"::"', '""',
            '"\\u003a"', '"é:ü"', '"a\\"b"', "123456789012345678", "12345678901234567890",
            "-9223372036854775809",
        ]
    ),
    st.integers(min_value=-(10**25), max_value=10**25).map(str),
)  # fmt: skip
_SPACE = st.sampled_from(["", " ", "\n "])


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    member = st.tuples(_KEYS, _SPACE, children).map(lambda m: f'"{m[0]}"{m[1]}:{m[1]}{m[2]}')
    return st.one_of(
        st.lists(member, max_size=4).map(lambda ms: "{" + ",".join(ms) + "}"),
        st.lists(children, max_size=4).map(lambda vs: "[" + ", ".join(vs) + "]"),
    )


_DOCUMENTS = st.recursive(_SCALARS, _containers, max_leaves=12)


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(_DOCUMENTS)
def test_loads_strict_agrees_with_an_independent_strict_reading(document: str) -> None:
    data = document.encode()
    got, expected = outcome(data), strict_oracle(data)
    assert got[0] == expected[0], (document, got, expected)
    if got[0] == "ok":
        assert same_value(got[1], expected[1]), document
    else:
        assert got[1] == expected[1], document


# === duplicate identity keys, end to end =========================================================


async def test_duplicate_identity_key_with_colons_is_refused_before_the_upstream(
    make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    gateway = await make_gateway()
    token = f"X-Sdk-Auth-Token: {tokens.good('alice')}"
    cases = [
        (EVENTS, b'{"customer_ids":{"registered":"alice","registered":"alice:x"}}'),
        (EVENTS, b'{"customer_ids":{"registered":"alice","registered":"mallory:1:2"},"t":"a:b"}'),
        (EVENTS, b'{"customer_ids":{"registered":"alice","registered":"alice\\u003ax"}}'),
        (
            BATCH,
            b'{"commands":[{"data":{"customer_ids":{"registered":"alice"}}},'
            b'{"data":{"customer_ids":{"registered":"alice","registered":"alice:x"}}}]}',
        ),
    ]
    for path, body in cases:
        answer = await raw_request(gateway.port, post(path, [token], body))
        assert answer.status == 400, (body, answer.body)
        error = answer.json()["error"]
        assert (error["code"], error["reason"]) == ("BAD_REQUEST", "duplicate_key"), body
        assert error["request_id"] == answer.headers["x-request-id"]
    assert upstream.received == []
    # The same token and user without the duplicate pass: the refusals above were for it.
    single = b'{"customer_ids":{"registered":"alice"},"note":"alice:x"}'
    answer = await raw_request(gateway.port, post(EVENTS, [token], single))
    assert answer.status == 200, answer.body
    assert [r.body for r in upstream.received] == [single.decode()]
    assert upstream.last_headers()["x-authenticated-user"] == "alice"


# === a token header segment checked once per verifier ===========================================


async def test_a_header_segment_seen_before_still_needs_a_valid_signature_and_claims(
    make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    """The second and later tokens with a known header segment skip only the header's checks:
    signature, expiry and subject are checked for every one of them."""
    gateway = await make_gateway()
    good = tokens.good("alice")
    header, _, signature = good.split(".")
    other_payload = tokens.good("mallory").split(".")[1]
    forged = f"{header}.{other_payload}.{signature}"  # mallory's claims under alice's signature
    expired = tokens.expired("alice")
    assert expired.split(".")[0] == header  # one header segment for all of them
    body = b'{"customer_ids":{"registered":"alice"}}'
    mallory_body = b'{"customer_ids":{"registered":"mallory"}}'

    def send(token: str, event: bytes) -> bytes:
        return post(EVENTS, [f"X-Sdk-Auth-Token: {token}"], event)

    for _ in range(2):  # the first round fills the memo; the second reads it
        assert (await raw_request(gateway.port, send(good, body))).status == 200
        refused = await raw_request(gateway.port, send(forged, mallory_body))
        assert refused.status == 401, refused.body
        assert refused.json()["error"]["reason"] == "signature_invalid", refused.body
        refused = await raw_request(gateway.port, send(expired, body))
        assert refused.status == 401, refused.body
        assert refused.json()["error"]["reason"] == "expired", refused.body
    assert [r.body for r in upstream.received] == [body.decode()] * 2


async def test_a_refused_header_segment_is_refused_every_time(
    make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens
) -> None:
    gateway = await make_gateway()
    unknown_kid = tokens.mint(tokens.claims("alice"), headers={"kid": "nobody"})
    body = b'{"customer_ids":{"registered":"alice"}}'
    for _ in range(3):
        refused = await raw_request(
            gateway.port, post(EVENTS, [f"X-Sdk-Auth-Token: {unknown_kid}"], body)
        )
        assert refused.status == 401, refused.body
    assert upstream.received == []


# === RS256/384/512: encode and compare ===========================================================

SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# The same DigestInfo without its NULL parameters, which some readers also accept.
SHA256_DIGEST_INFO_NO_NULL = bytes.fromhex("302f300b06096086480165030402010420")
SHA1_DIGEST_INFO = bytes.fromhex("3021300906052b0e03021a05000414")
MESSAGE = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def raw_signature(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """`block` through the private-key operation with no padding of its own: a signature over
    whatever encoding the test builds."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    return pow(int.from_bytes(block, "big"), numbers.d, n).to_bytes(len(block), "big")


def pkcs1_block(content: bytes, *, block_type: bytes = b"\x01", filler: bytes = b"\xff") -> bytes:
    return b"\x00" + block_type + filler * (256 - 3 - len(content)) + b"\x00" + content


def openssl_verdict(key: rsa.RSAPrivateKey, alg: str, message: bytes, signature: bytes) -> bool:
    """What OpenSSL's `RSA_verify` (cryptography's `verify`) says."""
    hash_algorithm = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}
    try:
        key.public_key().verify(signature, message, padding.PKCS1v15(), hash_algorithm[alg])
    except InvalidSignature:
        return False
    return True


@pytest.fixture(scope="module")
def forgeries(rsa_key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    return forged_signatures(rsa_key)


def forged_signatures(key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    digest = hashlib.sha256(MESSAGE).digest()
    n = key.public_key().public_numbers().n
    return {
        "sha1 digest info": raw_signature(key, pkcs1_block(SHA1_DIGEST_INFO + digest[:20])),
        "digest info without NULL": raw_signature(
            key, pkcs1_block(SHA256_DIGEST_INFO_NO_NULL + digest)
        ),
        "digest of other bytes": raw_signature(
            key, pkcs1_block(SHA256_DIGEST_INFO + hashlib.sha256(b"other").digest())
        ),
        "byte after the digest": raw_signature(
            key, pkcs1_block(SHA256_DIGEST_INFO + digest + b"\x00")
        ),
        "garbage before the digest info": raw_signature(
            key, pkcs1_block(b"\x00" * 180 + SHA256_DIGEST_INFO + digest)
        ),
        "zero filler": raw_signature(key, pkcs1_block(SHA256_DIGEST_INFO + digest, filler=b"\0")),
        "block type 2": raw_signature(
            key, pkcs1_block(SHA256_DIGEST_INFO + digest, block_type=b"\x02")
        ),
        "block type 0": raw_signature(
            key, pkcs1_block(SHA256_DIGEST_INFO + digest, block_type=b"\x00")
        ),
        "the modulus": n.to_bytes(256, "big"),
        "past the modulus": (n + 1).to_bytes(256, "big"),
        "zero": bytes(256),
        "one": (1).to_bytes(256, "big"),
        "all ones": b"\xff" * 256,
        "one byte long": b"\x00" + raw_signature(key, pkcs1_block(SHA256_DIGEST_INFO + digest)),
        "empty": b"",
    }


def test_a_signature_encoded_as_rs256_encodes_it_verifies(rsa_key: rsa.RSAPrivateKey) -> None:
    """The block built here by hand is the one OpenSSL signs: the forgeries below differ from
    it in one thing each."""
    digest = hashlib.sha256(MESSAGE).digest()
    signature = raw_signature(rsa_key, pkcs1_block(SHA256_DIGEST_INFO + digest))
    assert signature == rsa_key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    assert ALGORITHMS["RS256"].verify(rsa_key.public_key(), MESSAGE, signature)


@pytest.mark.parametrize(
    "forgery",
    [
        "sha1 digest info",
        "digest info without NULL",
        "digest of other bytes",
        "byte after the digest",
        "garbage before the digest info",
        "zero filler",
        "block type 2",
        "block type 0",
        "the modulus",
        "past the modulus",
        "zero",
        "one",
        "all ones",
        "one byte long",
        "empty",
    ],
)
def test_a_forged_rs256_signature_is_refused_as_openssl_refuses_it(
    rsa_key: rsa.RSAPrivateKey, forgeries: dict[str, bytes], forgery: str
) -> None:
    signature = forgeries[forgery]
    assert not openssl_verdict(rsa_key, "RS256", MESSAGE, signature)
    assert not ALGORITHMS["RS256"].verify(rsa_key.public_key(), MESSAGE, signature)


def test_a_signature_with_its_leading_zero_byte_dropped_is_refused(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """One signature in 256 starts with a zero byte. Without it, the raw RSA operation reads
    the same number; `RSA_verify` refuses a signature shorter than the modulus, and so must
    we."""
    message, signature = next(
        (m, s)
        for m in (MESSAGE + str(i).encode() for i in range(100_000))
        if (s := rsa_key.sign(m, padding.PKCS1v15(), hashes.SHA256()))[0] == 0
    )
    assert ALGORITHMS["RS256"].verify(rsa_key.public_key(), message, signature)
    assert not openssl_verdict(rsa_key, "RS256", message, signature[1:])
    assert not ALGORITHMS["RS256"].verify(rsa_key.public_key(), message, signature[1:])


@pytest.mark.parametrize("signed", ["RS256", "RS384", "RS512"])
@pytest.mark.parametrize("checked", ["RS256", "RS384", "RS512"])
def test_rs_signatures_verify_under_their_own_hash_only(
    rsa_key: rsa.RSAPrivateKey, signed: str, checked: str
) -> None:
    hash_algorithm = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}
    signature = rsa_key.sign(MESSAGE, padding.PKCS1v15(), hash_algorithm[signed])
    verdict = ALGORITHMS[checked].verify(rsa_key.public_key(), MESSAGE, signature)
    assert verdict == openssl_verdict(rsa_key, checked, MESSAGE, signature) == (signed == checked)
    assert not ALGORITHMS[checked].verify(rsa_key.public_key(), MESSAGE + b"x", signature)


# === a user or session id checked as text without the regex when ASCII =========================


@pytest.mark.parametrize("code", range(0x80))
def test_an_ascii_id_is_text_exactly_when_the_regex_says_so(code: int) -> None:
    for text in (chr(code), f"user-{chr(code)}", f"{chr(code)}user", chr(code) * 3):
        assert is_identity_text(text) == (_IDENTITY_TEXT.fullmatch(text) is not None), repr(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", False),  # ASCII, but empty
        (" ", True),
        ("é", True),
        ("ユーザー", True),
        ("user\u200b", True),  # exact comparison, so a zero-width space is just a character
        ("user\x85", False),  # C1 control
        ("user\x9f", False),
        ("\ud800", False),  # lone surrogate
        ("é\x00", False),
    ],
)
def test_an_id_outside_the_ascii_shortcut_is_read_by_the_regex(text: str, expected: bool) -> None:
    assert is_identity_text(text) is expected


# === request header names read normalised ========================================================


def test_header_key_reads_underscore_as_dash_in_lower_case() -> None:
    assert header_key(b"Content_Encoding") == "content-encoding"
    assert header_key(b"X_REQUEST_ID") == "x-request-id"
    assert header_key(b"x-request-id") == "x-request-id"


@pytest.mark.parametrize(
    "name", ["Content-Encoding", "Content_Encoding", "content_encoding", "CONTENT_ENCODING"]
)
async def test_content_encoding_under_any_spelling_is_decoded_authorised_and_stripped(
    make_gateway: GatewayFactory, upstream: Upstream, tokens: Tokens, name: str
) -> None:
    gateway = await make_gateway()
    plain = b'{"customer_ids": {"registered": "alice"}, "at": "12:00:01"}'
    compressed = gzip.compress(plain)
    # The decoded identity is what is authorised: a token for someone else is refused ...
    mismatch = [f"{name}: gzip", f"X-Sdk-Auth-Token: {tokens.good('mallory')}"]
    refused = await raw_request(gateway.port, post(EVENTS, mismatch, compressed))
    assert refused.status == 401, refused.body
    assert refused.json()["error"]["reason"] == "subject_mismatch"
    assert upstream.received == []
    # ... and the decoded bytes are what is forwarded, under no Content-Encoding spelling.
    matching = [f"{name}: gzip", f"X-Sdk-Auth-Token: {tokens.good('alice')}"]
    answer = await raw_request(gateway.port, post(EVENTS, matching, compressed))
    assert answer.status == 200, answer.body
    received = upstream.received[-1]
    assert received.body == plain.decode()
    forwarded = [(normalised(n), v) for n, v in received.headers]
    assert [v for n, v in forwarded if n == "content-encoding"] == []
    assert [v for n, v in forwarded if n == "content-length"] == [str(len(plain))]
    assert dict(forwarded)["x-authenticated-user"] == "alice"


@pytest.mark.parametrize("name", ["X-Request-Id", "X_Request_Id", "x_request_id"])
async def test_request_id_under_any_spelling_is_used_and_forwarded_once(
    make_gateway: GatewayFactory, upstream: Upstream, name: str
) -> None:
    gateway = await make_gateway()
    answer = await raw_request(gateway.port, post(EVENTS, [f"{name}: abc123"], ANONYMOUS))
    assert answer.status == 200, answer.body
    assert answer.headers["x-request-id"] == "abc123"
    forwarded = upstream.received[-1].headers
    assert [v for n, v in forwarded if normalised(n) == "x-request-id"] == ["abc123"]
    # A refusal carries it too, in the header and in the contract's JSON.
    identified = b'{"customer_ids": {"registered": "alice"}}'
    refused = await raw_request(gateway.port, post(EVENTS, [f"{name}: abc123"], identified))
    assert refused.status == 401, refused.body
    assert refused.headers["x-request-id"] == "abc123"
    assert refused.json()["error"]["request_id"] == "abc123"
    assert len(upstream.received) == 1


# === answers on a kept-alive upstream connection ==================================================


class ScriptedUpstream:
    """A keep-alive HTTP/1.1 upstream that answers each request with `answer(method)`, bytes
    the test fixes (for HEAD, the head alone). It records (method, connection number, head)."""

    def __init__(self, answer: Callable[[str], bytes]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, int, bytes]] = []
        self._connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def methods(self) -> list[tuple[str, int]]:
        return [(method, number) for method, number, _ in self.requests]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self._connections = self._connections, self._connections + 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].decode()
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and int(value):
                        await reader.readexactly(int(value))
                self.requests.append((method, number, head))
                writer.write(self.answer(method))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway closed its pooled connection
        finally:
            writer.close()
            self._writers.discard(writer)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        if self._handlers:
            _, pending = await asyncio.wait(self._handlers, timeout=5)
            assert not pending, "an upstream handler did not finish"


ScriptedFactory = Callable[[Callable[[str], bytes]], Awaitable[ScriptedUpstream]]


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedFactory]:
    started: list[ScriptedUpstream] = []

    async def start(answer: Callable[[str], bytes]) -> ScriptedUpstream:
        upstream = ScriptedUpstream(answer)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.close()


def fixed(head: bytes, body: bytes) -> Callable[[str], bytes]:
    """The same head for every method; the body only when the method has one."""
    return lambda method: head if method == "HEAD" else head + body


def unique_head(*lines: str) -> bytes:
    """A head no other test sends (`X-Nonce`), so the first answer is really parsed afresh."""
    nonce = f"X-Nonce: {os.urandom(8).hex()}"
    return ("\r\n".join(["HTTP/1.1 200 OK", nonce, *lines]) + "\r\n\r\n").encode()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if normalised(n) == normalised(name)]


class Client:
    """One client connection to the gateway, one request at a time, every read bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, method: str, request_id: str | None = None) -> Answer:
        lines = [f"{method} {SDK_CONFIG} HTTP/1.1", "Host: 127.0.0.1", "X-App-Id: app"]
        if request_id is not None:
            lines.append(f"X-Request-Id: {request_id}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self.writer.drain()
        async with asyncio.timeout(5):
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *fields = head[:-4].split("\r\n")
            headers = [(n.strip(), v.strip()) for n, _, v in (f.partition(":") for f in fields)]
            if method == "HEAD":
                return Answer(int(status_line.split()[1]), headers, b"")
            (length,) = [v for n, v in headers if n.lower() == "content-length"]
            body = await self.reader.readexactly(int(length))
        return Answer(int(status_line.split()[1]), headers, body)


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Client(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def head_allowed(config: dict[str, Any]) -> None:
    route = next(r for r in config["routes"] if r["name"] == "sdk-config")
    route["methods"] = ["GET", "HEAD"]


async def gateway_port(make_gateway: GatewayFactory, upstream: ScriptedUpstream) -> int:
    running = await make_gateway(head_allowed, upstream={"url": upstream.url, "timeout_seconds": 5})
    return running.port


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(["HEAD", "GET", "GET", "HEAD", "GET"], id="head_first"),
        pytest.param(["GET", "HEAD", "HEAD", "GET", "GET"], id="get_first"),
    ],
)
async def test_head_and_get_with_one_head_both_frame_right(
    make_gateway: GatewayFactory, scripted: ScriptedFactory, order: list[str]
) -> None:
    head = unique_head("Content-Type: text/plain", "Content-Length: 5")
    upstream = await scripted(fixed(head, b"hello"))
    port = await gateway_port(make_gateway, upstream)
    async with connect(port) as client:
        for method in order:
            answer = await client.ask(method)
            assert answer.status == 200, (method, answer)
            assert answer.values("Content-Type") == ["text/plain"]
            if method == "GET":
                assert answer.body == b"hello"
            else:
                assert answer.values("Content-Length") in ([], ["5"])
            assert answer.values("Connection") == []
    # One upstream connection carried every exchange: no answer left bytes behind on it.
    assert upstream.methods == [(method, 0) for method in order]


@pytest.mark.parametrize(
    ("connection", "secret"),
    [
        pytest.param("Connection: X-Secret", "X-Secret: 1", id="named"),
        pytest.param("Connection: keep-alive, x-secret", "X-Secret: 1", id="among_others"),
        pytest.param("Connection: X_Secret", "X-Secret: 1", id="named_with_underscore"),
        pytest.param("Connection: X-Secret", "X_Secret: 1", id="sent_with_underscore"),
    ],
)
async def test_hop_by_hop_answer_fields_never_reach_the_client(
    make_gateway: GatewayFactory, scripted: ScriptedFactory, connection: str, secret: str
) -> None:
    head = unique_head(
        connection,
        secret,
        "Keep-Alive: timeout=5",
        "X-Visible: yes",
        "Content-Type: application/json",
        "Content-Length: 2",
    )
    upstream = await scripted(fixed(head, b"{}"))
    port = await gateway_port(make_gateway, upstream)
    async with connect(port) as client:
        for _ in range(3):  # the first answer parses the head, the others find it cached
            answer = await client.ask("GET")
            assert (answer.status, answer.body) == (200, b"{}")
            assert answer.values("X-Visible") == ["yes"]
            assert answer.values("X-Secret") == []
            assert answer.values("Keep-Alive") == []
            assert answer.values("Connection") == []
    assert upstream.methods == [("GET", 0)] * 3


@pytest.mark.parametrize(
    "upstream_lines",
    [
        pytest.param(["X-Request-Id: from-upstream"], id="upstream_sends_one"),
        pytest.param(["x-request-id: from-upstream"], id="lower_case"),
        pytest.param([], id="upstream_sends_none"),
    ],
)
async def test_the_gateway_request_id_replaces_the_upstreams_on_every_answer(
    make_gateway: GatewayFactory, scripted: ScriptedFactory, upstream_lines: list[str]
) -> None:
    upstream = await scripted(fixed(unique_head(*upstream_lines, "Content-Length: 2"), b"ok"))
    port = await gateway_port(make_gateway, upstream)
    async with connect(port) as client:
        for n in range(3):  # the first answer parses the head, the others find it cached
            answer = await client.ask("GET", f"client-{n}")
            assert answer.values("X-Request-Id") == [f"client-{n}"]
            assert answer.body == b"ok"
        generated = await client.ask("GET")  # no id from the client: the gateway makes one
        (request_id,) = generated.values("X-Request-Id")
        assert request_id not in ("from-upstream", "client-0", "client-1", "client-2")
    forwarded = [head for _, _, head in upstream.requests]
    assert [f"X-Request-Id: client-{n}\r\n".encode() in forwarded[n] for n in range(3)] == [
        True
    ] * 3


@pytest.mark.parametrize(
    "date_line",
    [
        pytest.param("Date: Tue, 01 Jan 2030 00:00:00 GMT", id="date"),
        pytest.param("date: Tue, 01 Jan 2030 00:00:00 GMT", id="lower_case"),
    ],
)
async def test_the_upstreams_date_is_relayed_once(
    make_gateway: GatewayFactory, scripted: ScriptedFactory, date_line: str
) -> None:
    upstream = await scripted(fixed(unique_head(date_line, "Content-Length: 2"), b"ok"))
    port = await gateway_port(make_gateway, upstream)
    async with connect(port) as client:
        for _ in range(3):
            answer = await client.ask("GET")
            assert answer.values("Date") == ["Tue, 01 Jan 2030 00:00:00 GMT"]


async def test_an_answer_without_date_gets_exactly_one(
    make_gateway: GatewayFactory, scripted: ScriptedFactory
) -> None:
    upstream = await scripted(fixed(unique_head("Content-Length: 2"), b"ok"))
    port = await gateway_port(make_gateway, upstream)
    async with connect(port) as client:
        for method in ["GET", "GET", "HEAD", "GET"]:
            answer = await client.ask(method)
            (date,) = answer.values("Date")
            assert parsedate_to_datetime(date).tzinfo is not None, date


# === bounded memos ===============================================================================


def test_a_memo_never_holds_more_than_its_size_and_keeps_what_it_was_given() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(3)
    for i in range(10):
        assert memo.keep(f"k{i}", i) == i
        assert len(memo) <= 3
        assert memo.get(f"k{i}") == i  # the newest is always there
    assert memo.get("k0") is None  # long since dropped


# --- compact segments: found by the dots ------------------------------------------------------


def test_a_token_has_three_segments_exactly_when_split_finds_three_non_empty_ones() -> None:
    """Every string of up to eight letters and dots: the dots found one by one agree with
    splitting at every dot (no empty header, payload or signature, no fourth segment)."""
    for length in range(9):
        for letters in itertools.product("a.", repeat=length):
            token = "".join(letters)
            segments = token.split(".")
            if len(segments) == 3 and all(segments):
                assert _compact_segments(token) == tuple(segments)
            else:
                with pytest.raises(Rejected) as refused:
                    _compact_segments(token)
                assert refused.value.reason is Reason.TOKEN_MALFORMED


# --- base64url segments: the canonical check by the last character -----------------------------


@pytest.mark.parametrize("length", range(1, 10))
def test_a_segment_is_accepted_exactly_when_it_is_the_canonical_encoding(length: int) -> None:
    """Every last character, at every remainder of the length by 4: the last-character check
    agrees with encoding the decoded bytes again (what it replaced)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    prefix = "".join(alphabet[byte % 64] for byte in os.urandom(length - 1))
    for last in alphabet:
        segment = prefix + last
        padded = segment + "=" * (-len(segment) % 4)
        canonical = len(segment) % 4 != 1 and (
            base64.urlsafe_b64encode(base64.urlsafe_b64decode(padded)).rstrip(b"=").decode()
            == segment
        )
        if canonical:
            assert _b64decode(segment) == base64.urlsafe_b64decode(padded)
        else:
            with pytest.raises(Rejected) as refused:
                _b64decode(segment)
            assert refused.value.reason is Reason.TOKEN_MALFORMED


@pytest.mark.parametrize("outsider", ["+", "/", "=", " ", "\n", ".", "%", "\x00", "é", "\ud800"])
@pytest.mark.parametrize("position", [0, 2, 5])
def test_a_segment_with_a_character_outside_base64url_is_malformed(
    outsider: str, position: int
) -> None:
    """The standard alphabet's `+` and `/`, padding, whitespace and anything else: base64
    readers that skip or translate them would read other bytes than the signer's. Four of
    them, so that a reader skipping them finds whole groups and no padding to complain of."""
    segment = "eyJhbGciOiJSUzI1NiJ9"
    with pytest.raises(Rejected) as refused:
        _b64decode(segment[:position] + outsider * 4 + segment[position:])
    assert refused.value.reason is Reason.TOKEN_MALFORMED


def reference_b64url(segment: str) -> bytes | None:
    """What `_b64decode` must do, written the slow way: only base64url characters, no
    impossible length, and the one canonical spelling of the bytes; None when refused."""
    if not all(c in B64URL_ALPHABET for c in segment) or len(segment) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return data if base64.urlsafe_b64encode(data).rstrip(b"=").decode() == segment else None


B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=3000)
@given(
    st.text(
        alphabet=st.sampled_from([*B64URL_ALPHABET, "+", "/", "=", " ", "\n", ".", "\x00", "é"]),
        max_size=24,
    )
    | st.text(alphabet=B64URL_ALPHABET, max_size=24).map(lambda s: s + "=" * (len(s) % 3))
)
def test_a_segment_decodes_exactly_as_the_reference_reads_it(segment: str) -> None:
    """Any text, mostly base64url with outsiders and padding mixed in: refused exactly when
    the reference refuses it, and otherwise the same bytes."""
    expected = reference_b64url(segment)
    if expected is None:
        with pytest.raises(Rejected):
            _b64decode(segment)
    else:
        assert _b64decode(segment) == expected


# === the verified-token cache ===================================================================


class _CountedUser(str):
    """A user id the collector tracks (it has a `__dict__`), so the entries holding one can be
    counted; a plain string's entries are not tracked at all (see below)."""


def verified(user: str) -> VerifiedToken:
    return verified_token(_CountedUser(user), 0.0, "k")


def live_entries() -> int:
    gc.collect()
    return sum(isinstance(o, _CountedUser) for o in gc.get_objects())


def test_cached_entries_of_string_users_are_left_alone_by_the_collector() -> None:
    """After one collection the collector no longer tracks an entry of strings and a float, so
    a full cache adds nothing to the collector's later passes; an entry whose user is a mapping
    (an `id_map` subject) stays tracked, as it must."""
    cache = TokenCache(100)
    entries = [verified_token(f"user-{n}", float(n), "k") for n in range(50)]
    mapped = verified_token({"uid": "alice"}, 0.0, "k")
    for n, entry in enumerate([*entries, mapped]):
        cache.put(n, entry)
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in entries)
    assert gc.is_tracked(mapped)
    assert all(cache.get(n) is entry for n, entry in enumerate(entries))


def test_new_entries_do_not_pile_up_in_the_collectors_youngest_generation() -> None:
    """While a dropped generation is freed, two entries an insertion, the collector's own
    trigger stays off; the cache runs the youngest generation's pass itself, so new entries do
    not wait for it by the ten thousand. (Thresholds as `gateway run` sets them.)"""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10_000, 50, 50)
    try:
        cache = TokenCache(200_000)
        most = 0
        for n in range(260_000):  # rotations at 100,000 and 200,000, then 50,000 freed
            cache.put(n, verified_token(f"user-{n}", 0.0, "k"))
            if n % 1000 == 0:
                most = max(most, len(gc.get_objects(generation=0)))
    finally:
        gc.set_threshold(*thresholds)
    assert most < 20_000


def test_a_token_used_again_and_again_stays_while_one_off_tokens_come_and_go() -> None:
    """The heavy user's token is used once per 100 new tokens; 50,000 one-off users pass
    through a cache of 1,000 and it is still there. What nobody used since is gone."""
    cache = TokenCache(1000)
    heavy = verified("heavy")
    cache.put(0, heavy)
    for n in range(1, 50_001):
        cache.put(n, verified(f"one-off-{n}"))
        if n % 100 == 0:
            assert cache.get(0) is heavy, n
        assert len(cache) <= 1000
    assert cache.get(1) is None  # long since dropped
    found = cache.get(50_000)
    assert found is not None
    assert token_user(found) == "one-off-50000"


def test_the_cache_holds_between_half_its_bound_and_its_bound_and_frees_what_it_drops() -> None:
    """Counting live objects, not the cache's own count: a dropped generation is freed over
    the following insertions, and never more than the bound is held at once."""
    before = live_entries()
    cache = TokenCache(200)
    for n in range(2_000):
        cache.put(n, verified(f"u{n}"))
        assert 100 <= len(cache) <= 200 or n < 100
        if n % 50 == 0:
            assert live_entries() - before <= 200, n
    # The last 100 are cached whatever the phase; the first 1,800 are not.
    assert all(cache.get(n) is not None for n in range(1_900, 2_000))
    assert all(cache.get(n) is None for n in range(1_800))


@pytest.mark.parametrize("size", [2, 3, 4, 10, 11])
def test_a_small_cache_fills_to_its_bound(size: int) -> None:
    """Both generations together hold the bound (rounded down to even), never more."""
    cache = TokenCache(size)
    for n in range(size * 5):
        cache.put(n, verified(f"u{n}"))
        assert len(cache) <= size
    assert len(cache) == size - size % 2
    assert cache.get(size * 5 - 1) is not None


def test_a_cache_of_size_zero_keeps_nothing() -> None:
    cache = TokenCache(0)
    cache.put(1, verified("alice"))
    assert cache.get(1) is None
    assert len(cache) == 0


def test_one_token_has_a_key_per_verifier() -> None:
    digest = token_digest("a.b.c")
    one, two = cache_salt(b"one"), cache_salt(b"two")
    assert cache_key(digest, one) != cache_key(digest, two)
    assert cache_key(digest, one) == cache_key(token_digest("a.b.c"), cache_salt(b"one"))
    assert cache_key(token_digest("a.b.d"), one) != cache_key(digest, one)
    assert 0 <= cache_key(digest, one) < 2**128


def test_tokens_with_one_expiry_share_one_float() -> None:
    cache = TokenCache(10)
    first, second = cache.expiry(float(2_000_000_000)), cache.expiry(float(2_000_000_000))
    assert first == second == 2e9
    assert first is second


# === JSON keys case-folded once each ============================================================


def test_a_case_variant_key_is_refused_however_many_keys_came_before_it() -> None:
    # More distinct keys than the case-fold memo holds, so it starts afresh part-way through;
    # the variant after them (a long s, which folds to s) is still a second reading.
    users: dict[str, Any] = {f"key-{i}": i for i in range(10_000)}
    users["registered"] = "alice"
    assert walk_json({"customer_ids": users}, ("customer_ids", "registered")) == ["alice"]
    users["regi\u017ftered"] = "mallory"
    with pytest.raises(Rejected) as refused:
        walk_json({"customer_ids": users}, ("customer_ids", "registered"))
    assert refused.value.reason is Reason.CASE_VARIANT_KEY
