"""Verification keys per project: parsed and checked once, looked up by `kid` per request."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.algorithms import ALGORITHMS, KeyType

MIN_RSA_BITS = 2048

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


class KeyProblem(ValueError):
    """A key that must not be loaded; the message names what is wrong, never the key itself."""


def fingerprint(public_key: object) -> str:
    """`SHA256:<base64>` of the DER SubjectPublicKeyInfo, as `ssh-keygen -l` prints keys."""
    assert isinstance(public_key, rsa.RSAPublicKey)
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def parse_public_pem(text: str) -> tuple[object, KeyType]:
    """A public key (or certificate) from PEM text, with the contract's load-time checks."""
    blocks = _PEM_BLOCK.findall(text)
    if not blocks:
        raise KeyProblem("not a PEM block (expected -----BEGIN PUBLIC KEY-----)")
    if len(blocks) > 1:
        raise KeyProblem("holds more than one PEM block; give one key per entry")
    label, body = blocks[0]
    if "PRIVATE KEY" in label:
        raise KeyProblem(
            "this is a private key; configure the public key only "
            "(the private key stays on the customer's backend)"
        )
    if not "".join(body.split()):
        raise KeyProblem("the PEM body is empty")
    data = text.encode()
    try:
        if label == "CERTIFICATE":
            public_key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyProblem(f"the {label} PEM block does not parse") from None
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyProblem(
                f"RSA key is {public_key.key_size} bits; at least {MIN_RSA_BITS} required"
            )
        return public_key, KeyType.RSA
    raise KeyProblem(f"unsupported key type {type(public_key).__name__}")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    key_type: KeyType
    key: object
    fingerprint: str
    algorithms: frozenset[str]


_generations = itertools.count(1)


@dataclass(frozen=True, slots=True)
class KeySet:
    """A project's keys at one moment; a new set (new keys, new policy) gets a new generation."""

    keys: tuple[VerificationKey, ...]
    generation: int = field(default_factory=lambda: next(_generations))
    by_kid: dict[str, VerificationKey] = field(init=False)
    by_algorithm: dict[str, tuple[VerificationKey, ...]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_kid", {k.kid: k for k in self.keys})
        by_algorithm = {
            alg: tuple(k for k in self.keys if alg in k.algorithms) for alg in ALGORITHMS
        }
        object.__setattr__(self, "by_algorithm", by_algorithm)
