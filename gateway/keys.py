"""Verification keys per project: parsed and checked once, looked up by `kid` per request."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.algorithms import ALGORITHMS, KeyType, key_type_of

MIN_RSA_BITS = 2048

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


class KeyProblem(ValueError):
    """A key that must not be loaded; the message names what is wrong, never the key itself."""


_SUPPORTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def material_digest(key: object) -> bytes:
    """SHA-256 of the key material: DER SubjectPublicKeyInfo, or the HMAC secret itself."""
    if isinstance(key, bytes):
        return hashlib.sha256(key).digest()
    assert hasattr(key, "public_bytes")
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def fingerprint(key: object) -> str:
    """`SHA256:<base64>` of a public key, as `ssh-keygen -l` prints keys. A secret shows only
    its length: even a hash of a weak secret would help someone guess it."""
    if isinstance(key, bytes):
        return f"secret ({len(key)} bytes)"
    return "SHA256:" + base64.b64encode(material_digest(key)).decode().rstrip("=")


def parse_secret(text: str) -> bytes:
    """An HMAC secret: raw UTF-8, or `base64:<standard or url-safe base64>`."""
    if text.startswith("base64:"):
        encoded = text.removeprefix("base64:").strip()
        try:
            secret = base64.b64decode(encoded.replace("-", "+").replace("_", "/"), validate=True)
        except ValueError:
            raise KeyProblem("base64: value does not decode") from None
    else:
        secret = text.encode()
    if not secret:
        raise KeyProblem("the secret is empty")
    return secret


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
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise KeyProblem(f"RSA key is {public_key.key_size} bits; at least {MIN_RSA_BITS} required")
    if isinstance(public_key, ec.EllipticCurvePublicKey) and not isinstance(
        public_key.curve, _SUPPORTED_CURVES
    ):
        raise KeyProblem(f"EC curve {public_key.curve.name} is not one JWS uses")
    key_type = key_type_of(public_key)
    if key_type is None:
        raise KeyProblem(f"unsupported key type {type(public_key).__name__}")
    return public_key, key_type


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str
    key_type: KeyType
    key: object  # a cryptography public key, or the HMAC secret's bytes
    fingerprint: str
    algorithms: frozenset[str]  # the project's algorithms this key may verify
    material: bytes  # `material_digest`: finds one key configured in two projects


@dataclass(frozen=True, slots=True)
class KeySet:
    """A project's keys at one moment, indexed for the per-request lookups."""

    keys: tuple[VerificationKey, ...]
    by_kid: dict[str, VerificationKey] = field(init=False)
    by_algorithm: dict[str, tuple[VerificationKey, ...]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_kid", {k.kid: k for k in self.keys})
        by_algorithm = {
            alg: tuple(k for k in self.keys if alg in k.algorithms) for alg in ALGORITHMS
        }
        object.__setattr__(self, "by_algorithm", by_algorithm)
