"""The `gateway` command. Nothing else imports this module."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from gateway.auth.algorithms import ALGORITHMS, KeyType, key_type_of

# Beyond the algorithm table (for --alg), each command imports what it uses when it runs:
# `gateway token mint` and `--help` start without loading the config schema or the server.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    from gateway.auth.subject import Identity
    from gateway.config.compiled import CompiledConfig
    from gateway.config.settings import ConfigError

    PrivateKey: TypeAlias = (
        rsa.RSAPrivateKey
        | ec.EllipticCurvePrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey
    )
    SigningKey: TypeAlias = PrivateKey | bytes  # bytes: an HMAC secret


def _config_path(args: argparse.Namespace) -> Path:
    value = args.config or os.environ.get("GATEWAY_CONFIG")
    if not value:
        raise SystemExit("gateway: no config: pass -c FILE or set GATEWAY_CONFIG")
    return Path(value)


def _load(path: Path) -> CompiledConfig:
    from gateway.base.clock import SystemClock
    from gateway.runtime.process import load_config

    return load_config(path, SystemClock())


def _print_problems(path: Path, error: ConfigError) -> None:
    if [p.path for p in error.problems] == [str(path)]:  # the file itself: one line says it
        print(f"gateway: config {path}: {error.problems[0].message}", file=sys.stderr)
        return
    print(f"config invalid: {path}", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


def _summary(config: CompiledConfig) -> list[str]:
    s = config.settings
    lines = [
        f"config OK: {config.source} (digest {config.digest[:12]})",
        f"listen {s.listen}  admin {s.admin_listen}  workers {s.workers}  "
        f"failure counter {s.failure_counter.backend} (threshold {s.failure_counter.threshold})",
        f"upstream {s.upstream.url}",
        "projects:",
    ]
    listed = [(pid, p) for pid, p in s.projects.items()]
    for pid, project in [*listed, ("(defaults)", s.defaults)]:
        subject = project.subject
        lines.append(
            f"  {pid}  mode={project.mode}  algorithms={','.join(project.algorithms)}  "
            f"subject={subject.claim}:{subject.format}:{subject.key}"
        )
        lines.extend(f"    key {kid}  {fp}" for kid, fp in config.key_fingerprints.get(pid, ()))
    lines.append("routes:")
    lines.extend(
        f"  {route.name}  {','.join(route.methods)} {route.path}  auth={','.join(route.auth)}"
        for route in s.routes
    )
    if config.warnings:
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in config.warnings)
    return lines


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.config.settings import ConfigError

    path = _config_path(args)
    try:
        config = _load(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    print("\n".join(_summary(config)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.config.settings import ConfigError
    from gateway.runtime.process import serve
    from gateway.telemetry.logs import configure_logging

    configure_logging()
    path = _config_path(args)
    try:
        config = _load(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    configure_logging(config.settings.log_level.upper())
    workers = args.workers or config.settings.workers
    count = (os.cpu_count() or 1) if workers == "auto" else int(workers)
    _install_uvloop()
    if count > 1:
        from gateway.runtime.workers import supervise

        return asyncio.run(supervise(path, count))
    asyncio.run(serve(path))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway.runtime.workers import serve_worker
    from gateway.telemetry.logs import configure_logging

    configure_logging()
    _install_uvloop()
    asyncio.run(serve_worker(Path(args.config), Path(args.admin_port_file)))
    return 0


def _install_uvloop() -> None:
    """uvloop, and a garbage collector tuned for a server: what exists at start-up (config,
    keys, modules) is frozen out of every collection, and the per-request garbage, which
    reference counting frees, triggers a young collection every 10,000 allocations, not 700
    (rare enough to cost little, frequent enough that a stray cycle never piles up)."""
    gc.freeze()
    gc.set_threshold(10_000, 50, 50)
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


CURVES = ("P-256", "P-384", "P-521")  # the curves of ES256, ES384 and ES512


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
    path = _config_path(args)
    try:
        loaded = load_settings(path)
        identity = _identity_argument(args.user)
        result = verdict(loaded, args.project, token, identity, at)
    except ConfigError as exc:
        _print_problems(path, exc)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.telemetry.logs import configure_logging
    from gateway.tools.demo import run_demo

    configure_logging("WARNING")
    asyncio.run(run_demo(args.listen, args.admin_listen, args.upstream_port))
    return 0


def cmd_sample_upstream(args: argparse.Namespace) -> int:
    from gateway.tools.sample_upstream import run_sample_upstream

    run_sample_upstream(args.listen, Path(args.ready_file) if args.ready_file else None)
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from gateway.config.settings import Settings

    print(json.dumps(Settings.model_json_schema(), indent=2))
    return 0


DISTRIBUTION = "ingestion-gateway"
DESCRIPTION = (
    "SDK-authentication gateway for mobile-analytics tracking APIs: it verifies the JWTs a "
    "customer's backend signs for its users, checks each request is about the token's user, "
    "and forwards it to the tracking API. Try `gateway demo` to see it work."
)
CONFIG_HELP = "the config file (default: $GATEWAY_CONFIG)"


class _Version(argparse.Action):
    """`--version`: read from the installed package's metadata, only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"gateway {version(DISTRIBUTION)}")
        except PackageNotFoundError:
            parser.exit(2, f"gateway: {DISTRIBUTION} is not installed (pip install -e .)\n")
        parser.exit()


def _workers_argument(value: str) -> int | str:
    if value == "auto":
        return value
    count = int(value)
    if not 1 <= count <= 256:
        raise argparse.ArgumentTypeError("from 1 to 256, or auto")
    return count


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help; an option without one says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


Commands = argparse._SubParsersAction  # the subparsers of a parser, to add commands to


def _command(
    owner: Commands[argparse.ArgumentParser], name: str, help: str
) -> argparse.ArgumentParser:
    return owner.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        formatter_class=_HelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    # The metavar keeps the internal `worker` command (see main) out of usage lines.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serving_commands(commands)
    _add_keygen(
        _command(commands, "keygen", "write a key pair for a customer backend to sign tokens with")
    )
    token = _command(commands, "token", "mint or inspect SDK tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    _add_mint(_command(token_commands, "mint", "print a signed JWT in the contract's shape"))
    _add_inspect(
        _command(
            token_commands,
            "inspect",
            "print a token's header and claims, and the gateway's verdict",
        )
    )
    _add_demo(
        _command(
            commands, "demo", "sample tracking API + gateway on generated keys, with curl commands"
        )
    )
    _sample_upstream_arguments(
        _command(commands, "sample-upstream", "run the bundled sample tracking API")
    )
    return parser


def _add_serving_commands(commands: Commands[argparse.ArgumentParser]) -> None:
    run = _command(commands, "run", "serve with a config until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", help=CONFIG_HELP)
    run.add_argument(
        "--workers",
        type=_workers_argument,
        help="worker processes, or auto for one per CPU (default: the config's workers)",
    )
    run.set_defaults(func=cmd_run)
    check = _command(commands, "check-config", "validate a config and summarise it")
    check.add_argument("-c", "--config", help=CONFIG_HELP)
    check.set_defaults(func=cmd_check_config)
    schema = _command(
        commands, "config-schema", "print the JSON Schema of the config file, for editors and CI"
    )
    schema.set_defaults(func=cmd_config_schema)


def _add_keygen(keygen: argparse.ArgumentParser) -> None:
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


def _add_mint(mint: argparse.ArgumentParser) -> None:
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


def _add_inspect(inspect: argparse.ArgumentParser) -> None:
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


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--listen", default="127.0.0.1:8080", help="the gateway's address")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090", help="the admin address")
    demo.add_argument("--upstream-port", type=int, default=8000, help="the sample API's port")
    demo.set_defaults(func=cmd_demo)


def _sample_upstream_arguments(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("--listen", default="127.0.0.1:8000", help="its address")
    sample.add_argument(
        "--ready-file",
        help="write the address here once listening, for scripts that wait for it (default: none)",
    )
    sample.set_defaults(func=cmd_sample_upstream)


def _worker_parser() -> argparse.ArgumentParser:
    """`gateway worker`: what `run` starts for each worker process; not for direct use."""
    worker = argparse.ArgumentParser(prog="gateway worker")
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--admin-port-file", required=True)
    worker.set_defaults(func=cmd_worker)
    return worker


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.http.sockets import StartupError

    arguments = sys.argv[1:] if argv is None else list(argv)
    # The worker command has a parser of its own, so no help, usage or error lists it.
    if arguments[:1] == ["worker"]:
        args = _worker_parser().parse_args(arguments[1:])
    else:
        args = build_parser().parse_args(arguments)
    try:
        code: int = args.func(args)
    except StartupError as exc:  # one line naming what failed, never a traceback
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
