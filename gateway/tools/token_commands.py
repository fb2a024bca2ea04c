"""`gateway keygen`, `gateway token mint` and `gateway token inspect`: the key pairs and tokens
a customer backend signs with, and what the gateway makes of a token.

Each `add_*` function adds one command's arguments to the parser `gateway.tools.cli` made for
it. Beyond the algorithm table (for --alg), each command imports what it uses when it runs, so
`gateway token mint` and `--help` start without loading the config schema or the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from gateway.auth.algorithms import ALGORITHMS, KeyType, key_type_of
from gateway.tools.config_file import config_path, print_problems

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    from gateway.auth.subject import Identity

    PrivateKey: TypeAlias = (
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
    )
    SigningKey: TypeAlias = PrivateKey | bytes  # bytes: an HMAC secret


# --- keygen ------------------------------------------------------------------------------------

CURVES = ("P-256", "P-384", "P-521")  # the curves of ES256, ES384 and ES512


def add_keygen(keygen: argparse.ArgumentParser) -> None:
    keygen.add_argument(
        "--type", choices=["rsa", "ec", "ed25519"], default="rsa", help="the kind of key"
    )
    keygen.add_argument(
        "--bits", type=int, help="RSA key size, at least 2048 (default: 2048; rsa only)"
    )
    keygen.add_argument(
        "--curve", choices=CURVES, help="the curve (default: P-256, for ES256; ec only)"
    )
    keygen.add_argument("--out-dir", default=".", help="where to write the two PEM files")
    keygen.add_argument(
        "--name", default="sdk-auth", help="file names: NAME.private.pem and NAME.public.pem"
    )
    keygen.set_defaults(func=cmd_keygen)


def _generate_key(args: argparse.Namespace) -> PrivateKey | str:
    """A new private key of the asked type, or why the options do not fit together."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if args.type != "rsa" and args.bits is not None:
        return "--bits applies to --type rsa only"
    if args.type != "ec" and args.curve is not None:
        return "--curve applies to --type ec only"
    if args.type == "ec":
        curves = dict(zip(CURVES, (ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()), strict=True))
        return ec.generate_private_key(curves[args.curve or CURVES[0]])
    if args.type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    bits = 2048 if args.bits is None else args.bits
    if bits < 2048:
        return "--bits must be at least 2048"
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _signing_algorithms(public_key: object) -> list[str]:
    """The algorithms the gateway verifies with this key: what `algorithms:` may list."""
    key_type = key_type_of(public_key)
    return [
        name
        for name, alg in ALGORITHMS.items()
        if alg.key_type is key_type and alg.fits(public_key) is None
    ]


def cmd_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from gateway.auth.keys import fingerprint

    key = _generate_key(args)
    if isinstance(key, str):
        print(f"gateway keygen: {key}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path = out_dir / f"{args.name}.private.pem"
    public_path = out_dir / f"{args.name}.public.pem"
    for existing in (private_path, public_path):
        if existing.exists():
            print(f"gateway keygen: {existing} exists; not overwriting", file=sys.stderr)
            return 1
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as private_file:
        private_file.write(private_pem)
    public_path.write_bytes(public_pem)
    print(f"private key: {private_path}  (keep on the customer backend only)")
    print(f"public key:  {public_path}  (put in the gateway config)")
    print(f"fingerprint: {fingerprint(key.public_key())}")
    print(f"algorithms:  {', '.join(_signing_algorithms(key.public_key()))}")
    return 0


# --- token mint --------------------------------------------------------------------------------


def add_mint(mint: argparse.ArgumentParser) -> None:
    _add_mint_key(mint)
    mint.add_argument("--user", required=True, help="the user id the token is for")
    mint.add_argument("--user-key", default="uid", help="the key of `sub`: {key, value}")
    mint.add_argument(
        "--ttl", type=int, default=3600, help="seconds until it expires; negative mints expired"
    )
    mint.add_argument(
        "--alg",
        choices=list(ALGORITHMS),
        help="the JWS algorithm (default: the first the key fits: RS256, ES256/384/512 by "
        "curve, EdDSA, HS256)",
    )
    mint.add_argument(
        "--kid",
        help="the key id header (default: none; the gateway then tries "
        "each key that fits the algorithm)",
    )
    mint.add_argument("--aud", help="the audience claim (default: none)")
    mint.add_argument("--iss", help="the issuer claim (default: none)")
    mint.set_defaults(func=cmd_token_mint)


def _add_mint_key(mint: argparse.ArgumentParser) -> None:
    """What `token mint` signs with: one of a private key, a secret, a secret's file."""
    key = mint.add_mutually_exclusive_group(required=True)
    key.add_argument(
        "--private-key",
        metavar="PEM_FILE",
        help="sign with this private key (RS*, PS*, ES*, EdDSA)",
    )
    key.add_argument(
        "--secret",
        help="sign with this HMAC secret (HS*), written as in the config: UTF-8 text, or "
        "base64:... (--secret-file keeps it out of shell history and ps)",
    )
    key.add_argument(
        "--secret-file",
        metavar="FILE",
        help="sign with the HMAC secret in this file (HS*), written like --secret; a final "
        "newline is not part of it",
    )


def _read_secret(args: argparse.Namespace) -> bytes | str:
    """The HMAC secret of --secret or --secret-file, read as the config reads `secret:`."""
    from gateway.auth.keys import KeyProblem, parse_secret

    where, text = "--secret", args.secret
    if args.secret_file is not None:
        where = args.secret_file
        try:
            # A file written by `echo` ends in a newline that is not part of the secret.
            text = Path(where).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            return f"{where}: {exc.strerror}"
        except UnicodeDecodeError:
            return f"{where}: not UTF-8 text"
    try:
        return parse_secret(text)
    except KeyProblem as exc:
        return f"{where}: {exc}"


def _read_private_key(path: str) -> SigningKey | str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return f"{path}: the key is encrypted; give it unencrypted"
    except ValueError:
        return f"{path}: not a PEM private key"
    signing = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if not isinstance(key, signing | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return f"{path}: a {type(key).__name__} signs no JWS algorithm"
    return key


_KEY_NAMES = {
    KeyType.RSA: "an RSA key",
    KeyType.EC: "an EC key",
    KeyType.OKP: "an Ed25519 or Ed448 key",
}


def _signing_key(args: argparse.Namespace) -> tuple[SigningKey, str] | str:
    """The key `token mint` signs with and its algorithm (--alg, or the first the key fits),
    or an error line; the key is checked against the algorithm as the gateway checks one."""
    key = _read_secret(args) if args.private_key is None else _read_private_key(args.private_key)
    if isinstance(key, str):
        return key
    public = key if isinstance(key, bytes) else key.public_key()
    key_type = key_type_of(public)
    assert key_type is not None  # the readers return only keys of a JWS type
    of_its_type = [n for n, a in ALGORITHMS.items() if a.key_type is key_type]
    # With none fitting (a short secret), the first of its type says what is wrong below.
    alg = args.alg or (_signing_algorithms(public) or of_its_type)[0]
    wanted = ALGORITHMS[alg].key_type
    if wanted is not key_type:
        if wanted is KeyType.HMAC:
            return f"--alg {alg} signs with --secret or --secret-file, not a private key"
        if key_type is KeyType.HMAC:
            return f"--alg {alg} signs with --private-key, not a secret"
        return (
            f"--alg {alg} needs {_KEY_NAMES[wanted]}; "
            f"{args.private_key} holds {_KEY_NAMES[key_type]}"
        )
    misfit = ALGORITHMS[alg].fits(public)
    if misfit is not None:
        return f"--alg {alg}: {misfit}"
    return key, alg


def cmd_token_mint(args: argparse.Namespace) -> int:
    import jwt

    signing = _signing_key(args)
    if isinstance(signing, str):
        print(f"gateway token mint: {signing}", file=sys.stderr)
        return 2
    key, alg = signing
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": {"key": args.user_key, "value": args.user},
        "iat": now,
        "exp": now + args.ttl,
    }
    if args.ttl < 0:
        claims["iat"] = now + args.ttl - 60  # an already expired token, for testing
    if args.aud:
        claims["aud"] = args.aud
    if args.iss:
        claims["iss"] = args.iss
    headers: dict[str, str] = {"typ": "JWT"}
    if args.kid:
        headers["kid"] = args.kid
    print(jwt.encode(claims, key, algorithm=alg, headers=headers))
    return 0


# --- token inspect -----------------------------------------------------------------------------


def add_inspect(inspect: argparse.ArgumentParser) -> None:
    inspect.add_argument("token", help="the token, or - to read it from stdin")
    inspect.add_argument(
        "-c", "--config", help="judge with this config (default: $GATEWAY_CONFIG, else no verdict)"
    )
    inspect.add_argument(
        "--project", help="the project the token is for; needed with a config (default: none)"
    )
    inspect.add_argument(
        "--user", help="the user the request names, a JSON map for id_map (default: none)"
    )
    inspect.add_argument("--at", type=float, help="judge as of this epoch time (default: now)")
    inspect.set_defaults(func=cmd_token_inspect)


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from gateway.config.settings import ConfigError, load_settings
    from gateway.telemetry.logs import utc_timestamp
    from gateway.tools.inspect import decode_unverified, verdict

    # `-` reads the token from stdin, which keeps it out of shell history.
    token = sys.stdin.read().strip() if args.token in {"-"} else args.token.strip()
    decoded = decode_unverified(token)
    if decoded.problem:
        print(f"token: {decoded.problem}")
    else:
        print("header: " + json.dumps(decoded.header, indent=2, sort_keys=True))
        print("claims: " + json.dumps(decoded.claims, indent=2, sort_keys=True))
    at = args.at if args.at is not None else time.time()
    exp = decoded.claims.get("exp") if isinstance(decoded.claims, dict) else None
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        print(f"expires: {utc_timestamp(exp)} ({int(exp - at)} s from {utc_timestamp(at)})")
    if not (args.config or os.environ.get("GATEWAY_CONFIG")):
        return 0
    if not args.project:
        print("gateway token inspect: --project is needed with a config", file=sys.stderr)
        return 2
    path = config_path(args)
    try:
        loaded = load_settings(path)
        identity = _identity_argument(args.user)
        result = verdict(loaded, args.project, token, identity, at)
    except ConfigError as exc:
        print_problems(path, exc)
        return 1
    if result.code == "VERIFIED":
        print(f"verdict: VERIFIED user={json.dumps(result.user)} key={result.kid}")
        return 0
    print(f"verdict: {result.code} (reason: {result.reason})")
    return 3


def _identity_argument(user: str | None) -> Identity | None:
    """`--user alice`, or a JSON map of ids for id_map subjects: `--user '{"registered": "a"}'`."""
    if user is None or not user.startswith("{"):
        return user
    try:
        ids = json.loads(user)
    except ValueError:
        return user
    if isinstance(ids, dict) and all(isinstance(v, str) for v in ids.values()):
        return {str(k): v for k, v in ids.items()}
    return user
