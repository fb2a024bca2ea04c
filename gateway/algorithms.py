"""JWS algorithms: which key type each one needs and how it checks a signature.

A key only ever verifies the algorithms of its own type, so the classic confusion (an RSA public
key used as an HMAC secret) has no code path to take.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


class KeyType(Enum):
    RSA = "RSA"


Verifier = Callable[[object, bytes, bytes], bool]


def _rsa_pkcs1(hash_type: type[hashes.HashAlgorithm]) -> Verifier:
    pad = padding.PKCS1v15()

    def verify(key: object, signing_input: bytes, signature: bytes) -> bool:
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            key.verify(signature, signing_input, pad, hash_type())
        except InvalidSignature:
            return False
        return True

    return verify


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    key_type: KeyType
    verify: Verifier


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("RS256", KeyType.RSA, _rsa_pkcs1(hashes.SHA256)),
        Algorithm("RS384", KeyType.RSA, _rsa_pkcs1(hashes.SHA384)),
        Algorithm("RS512", KeyType.RSA, _rsa_pkcs1(hashes.SHA512)),
    )
}
