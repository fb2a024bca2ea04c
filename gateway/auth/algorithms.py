"""JWS algorithms: which key each one needs and how it checks a signature.

A key only ever verifies the algorithms of its own type (and, for EC, its own curve), so the
classic confusions — an RSA public key used as an HMAC secret, a P-256 key under ES512 — have
no code path to take.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gateway.base.hashing import prepared_digest


class KeyType(Enum):
    RSA = "RSA"
    EC = "EC"
    OKP = "OKP"  # Ed25519 / Ed448
    HMAC = "HMAC"


def key_type_of(key: object) -> KeyType | None:
    if isinstance(key, rsa.RSAPublicKey):
        return KeyType.RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        return KeyType.EC
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return KeyType.OKP
    if isinstance(key, bytes):
        return KeyType.HMAC
    return None


Verify = Callable[[object, bytes, bytes], bool]
Fits = Callable[[object], str | None]  # None when the key fits, else why it does not


def _checked(check: Callable[[object, bytes, bytes], None]) -> Verify:
    def verify(key: object, signing_input: bytes, signature: bytes) -> bool:
        try:
            check(key, signing_input, signature)
        except InvalidSignature:
            return False
        return True

    return verify


# RFC 8017 §9.2, note 1: the DER of a DigestInfo up to the digest itself.
_DIGEST_INFO_PREFIX: Final = {
    256: bytes.fromhex("3031300d060960864801650304020105000420"),
    384: bytes.fromhex("3041300d060960864801650304020205000430"),
    512: bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _rsa_pkcs1(size: int) -> Verify:
    """RSASSA-PKCS1-v1_5 verification as RFC 8017 §8.2.2 states it, and as OpenSSL's own
    `RSA_verify` does it: a signature exactly as long as the modulus, the RSA operation, the
    block's `00 01 FF..FF 00` checked by OpenSSL, and what follows compared whole with the
    DigestInfo of the expected digest (encode and compare: nothing of the block is parsed).

    Through `recover_data_from_signature` rather than `verify`: `verify` sets up a digest and
    a signature algorithm in OpenSSL for every call, 2 µs of the ~19 a token's verification
    takes. The length is checked here because the raw operation, unlike `RSA_verify`, reads a
    shorter signature as one with leading zeros."""
    prefix = _DIGEST_INFO_PREFIX[size]
    digest = prepared_digest(f"sha{size}")
    pkcs1 = padding.PKCS1v15()

    def verify(key: object, signing_input: bytes, signature: bytes) -> bool:
        # Only RSA keys are given RSA algorithms (`KeyType`); an isinstance of the ABC here would
        # cost half a microsecond a token.
        rsa_key = cast("rsa.RSAPublicKey", key)
        if len(signature) != (rsa_key.key_size + 7) // 8:
            return False
        try:
            block = rsa_key.recover_data_from_signature(signature, pkcs1, None)
        except InvalidSignature:
            return False
        # Nothing secret is compared: both sides are computed from what the client sent.
        return block == prefix + digest(signing_input)

    return verify


def _rsa_pss(size: int) -> Verify:
    hash_algorithm = {256: hashes.SHA256(), 384: hashes.SHA384(), 512: hashes.SHA512()}[size]
    # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output.
    pss = padding.PSS(padding.MGF1(hash_algorithm), hash_algorithm.digest_size)

    def check(key: object, signing_input: bytes, signature: bytes) -> None:
        # Only RSA keys are given RSA algorithms (`KeyType`).
        cast("rsa.RSAPublicKey", key).verify(signature, signing_input, pss, hash_algorithm)

    return _checked(check)


def _ecdsa(size: int, curve: type[ec.EllipticCurve], coordinate: int) -> tuple[Verify, Fits]:
    """`coordinate`: bytes of r and of s; a JWS signature is r || s, not DER."""
    hash_algorithm = {256: hashes.SHA256(), 384: hashes.SHA384(), 512: hashes.SHA512()}[size]

    def check(key: object, signing_input: bytes, signature: bytes) -> None:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        if len(signature) != 2 * coordinate:
            raise InvalidSignature
        r = int.from_bytes(signature[:coordinate], "big")
        s = int.from_bytes(signature[coordinate:], "big")
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hash_algorithm))

    def fits(key: object) -> str | None:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        if isinstance(key.curve, curve):
            return None
        return f"curve {key.curve.name} does not fit; it needs {curve.name}"

    return _checked(check), fits


def _eddsa_check(key: object, signing_input: bytes, signature: bytes) -> None:
    assert isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    key.verify(signature, signing_input)


def _hmac(name: str, digest: Callable[[], hashlib._Hash]) -> tuple[Verify, Fits]:
    minimum = digest().digest_size

    def verify(key: object, signing_input: bytes, signature: bytes) -> bool:
        assert isinstance(key, bytes)
        expected = hmac.new(key, signing_input, digest).digest()
        return hmac.compare_digest(expected, signature)

    def fits(key: object) -> str | None:
        assert isinstance(key, bytes)
        if len(key) >= minimum:
            return None
        return f"HMAC secret is {len(key)} bytes; {name} needs at least {minimum}"

    return verify, fits


def _any_key(_: object) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    key_type: KeyType
    verify: Verify
    fits: Fits = _any_key


def _table() -> dict[str, Algorithm]:
    algorithms = [Algorithm(f"RS{size}", KeyType.RSA, _rsa_pkcs1(size)) for size in (256, 384, 512)]
    algorithms += [Algorithm(f"PS{size}", KeyType.RSA, _rsa_pss(size)) for size in (256, 384, 512)]
    for size, curve, coordinate in (
        (256, ec.SECP256R1, 32),
        (384, ec.SECP384R1, 48),
        (512, ec.SECP521R1, 66),
    ):
        verify, fits = _ecdsa(size, curve, coordinate)
        algorithms.append(Algorithm(f"ES{size}", KeyType.EC, verify, fits))
    algorithms.append(Algorithm("EdDSA", KeyType.OKP, _checked(_eddsa_check)))
    for size, digest in ((256, hashlib.sha256), (384, hashlib.sha384), (512, hashlib.sha512)):
        verify, fits = _hmac(f"HS{size}", digest)
        algorithms.append(Algorithm(f"HS{size}", KeyType.HMAC, verify, fits))
    return {a.name: a for a in algorithms}


ALGORITHMS: Final[dict[str, Algorithm]] = _table()
