"""Verification keys per project: parsed and checked once, looked up by `kid` per request."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.auth.algorithms import ALGORITHMS, KeyType, key_type_of
from gateway.auth.jsonstrict import JSONRejected, loads_strict

log = logging.getLogger("gateway.keys")

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


def verification_key(
    kid: str, key: object, key_type: KeyType, allowed: frozenset[str], only: str | None = None
) -> VerificationKey:
    """A key with the project's algorithms it can verify (`only`: a JWK's own `alg`)."""
    of_its_type = sorted(n for n, a in ALGORITHMS.items() if a.key_type is key_type)
    wanted = [a for a in sorted(allowed) if a in of_its_type and (only is None or a == only)]
    misfits = {a: ALGORITHMS[a].fits(key) for a in wanted}
    usable = frozenset(a for a, why in misfits.items() if why is None)
    if not usable:
        why_not = "; ".join(sorted({why for why in misfits.values() if why}))
        raise KeyProblem(
            why_not
            or f"{key_type.value} key has no allowed algorithm: algorithms lists "
            f"{', '.join(sorted(allowed))}; add one of {', '.join(of_its_type)}"
        )
    return VerificationKey(kid, key_type, key, fingerprint(key), usable, material_digest(key))


# --- JWKS --------------------------------------------------------------------------------------

MAX_JWKS_BYTES = 256 * 1024
_PRIVATE_PARAMETERS = ("d", "p", "q", "dp", "dq", "qi", "oth")
_CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


def _b64_int(jwk: dict[str, object], name: str) -> int:
    return int.from_bytes(_b64_bytes(jwk, name), "big")


def _b64_bytes(jwk: dict[str, object], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise KeyProblem(f"{name} is missing")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        raise KeyProblem(f"{name} is not base64url") from None


def _jwk_key(jwk: dict[str, object], allow_secrets: bool) -> tuple[object, KeyType]:
    kty = jwk.get("kty")
    if any(p in jwk for p in _PRIVATE_PARAMETERS):
        raise KeyProblem("holds private key parameters; publish public keys only")
    if kty == "RSA":
        public: object = rsa.RSAPublicNumbers(_b64_int(jwk, "e"), _b64_int(jwk, "n")).public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        if public.key_size < MIN_RSA_BITS:
            raise KeyProblem(f"RSA key is {public.key_size} bits; at least {MIN_RSA_BITS} required")
        return public, KeyType.RSA
    if kty == "EC":
        curve = _CURVES.get(str(jwk.get("crv")))
        if curve is None:
            raise KeyProblem(f"crv must be one of {', '.join(_CURVES)}")
        numbers = ec.EllipticCurvePublicNumbers(_b64_int(jwk, "x"), _b64_int(jwk, "y"), curve)
        return numbers.public_key(), KeyType.EC
    if kty == "OKP":
        crv = jwk.get("crv")
        if crv == "Ed25519":
            return ed25519.Ed25519PublicKey.from_public_bytes(_b64_bytes(jwk, "x")), KeyType.OKP
        if crv == "Ed448":
            return ed448.Ed448PublicKey.from_public_bytes(_b64_bytes(jwk, "x")), KeyType.OKP
        raise KeyProblem("crv must be Ed25519 or Ed448")
    if kty == "oct" and allow_secrets:
        return _b64_bytes(jwk, "k"), KeyType.HMAC
    raise KeyProblem(f"kty {kty!r} is not supported here")


def parse_jwks(
    data: bytes, allowed: frozenset[str], *, allow_secrets: bool
) -> list[VerificationKey]:
    """Every key of a JWK Set, checked like config keys; a problem names the key's index."""
    if len(data) > MAX_JWKS_BYTES:
        raise KeyProblem(f"larger than {MAX_JWKS_BYTES} bytes")
    try:
        document = loads_strict(data)
    except JSONRejected as exc:
        raise KeyProblem(f"not one JSON document ({exc})") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyProblem('expected {"keys": [...]}')
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(entries):
        try:
            if not _for_verification(jwk):
                log.warning(
                    "JWKS key not for verifying signatures: not used",
                    extra={"fields": {"index": index, "kid": jwk.get("kid")}},
                )
                continue
            key = _jwk_entry(jwk, allowed, allow_secrets)
        except (KeyProblem, ValueError) as exc:
            raise KeyProblem(f"keys[{index}]: {exc}") from None
        if any(k.kid == key.kid for k in keys):
            raise KeyProblem(f"keys[{index}]: kid {key.kid!r} appears twice")
        keys.append(key)
    return keys


def _for_verification(jwk: object) -> bool:
    """Whether a JWK may verify signatures (RFC 7517 §4.2, §4.3). A set often publishes its
    encryption keys beside its signing keys: those are left out, not an error of the set."""
    if not isinstance(jwk, dict):
        raise KeyProblem("not an object")
    use = jwk.get("use", "sig")
    operations = jwk.get("key_ops", ["verify"])
    if not isinstance(use, str):
        raise KeyProblem("use is not a string")
    if not isinstance(operations, list) or not all(isinstance(o, str) for o in operations):
        raise KeyProblem("key_ops is not a list of strings")
    return use == "sig" and "verify" in operations


def _jwk_entry(
    jwk: dict[str, Any], allowed: frozenset[str], allow_secrets: bool
) -> VerificationKey:
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise KeyProblem("kid is missing")
    alg = jwk.get("alg")
    if alg is not None and alg not in ALGORITHMS:
        raise KeyProblem(f"alg {alg!r} is not supported")
    key, key_type = _jwk_key(jwk, allow_secrets)
    return verification_key(kid, key, key_type, allowed, alg)
