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
from typing import cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature


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


def _rsa(pad: Callable[[hashes.HashAlgorithm], padding.AsymmetricPadding], size: int) -> Verify:
    hash_algorithm = {256: hashes.SHA256(), 384: hashes.SHA384(), 512: hashes.SHA512()}[size]
    chosen = pad(hash_algorithm)

    def check(key: object, signing_input: bytes, signature: bytes) -> None:
        # Only RSA keys are given RSA algorithms (`KeyType`); an isinstance of the ABC here would
        # cost half a microsecond a token.
        cast("rsa.RSAPublicKey", key).verify(signature, signing_input, chosen, hash_algorithm)

    return _checked(check)


def _pkcs1(_: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    return padding.PKCS1v15()


def _pss(hash_algorithm: hashes.HashAlgorithm) -> padding.AsymmetricPadding:
    # RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output.
    return padding.PSS(padding.MGF1(hash_algorithm), hash_algorithm.digest_size)


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
    algorithms = [
        Algorithm(f"RS{size}", KeyType.RSA, _rsa(_pkcs1, size)) for size in (256, 384, 512)
    ]
    algorithms += [
        Algorithm(f"PS{size}", KeyType.RSA, _rsa(_pss, size)) for size in (256, 384, 512)
    ]
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


ALGORITHMS: dict[str, Algorithm] = _table()
