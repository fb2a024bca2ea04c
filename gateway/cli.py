"""The `gateway` command (SPEC §2). Nothing else imports this module."""

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

from gateway.clock import SystemClock
from gateway.compiled import CompiledConfig
from gateway.config import ConfigError
from gateway.subject import Identity


def _config_path(args: argparse.Namespace) -> Path:
    value = args.config or os.environ.get("GATEWAY_CONFIG")
    if not value:
        raise SystemExit("gateway: no config: pass -c FILE or set GATEWAY_CONFIG")
    return Path(value)


def _load(path: Path) -> CompiledConfig:
    from gateway.server import load_config

    return load_config(path, SystemClock())


def _print_problems(path: Path, error: ConfigError) -> None:
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
    path = _config_path(args)
    try:
        config = _load(path)
    except ConfigError as exc:
        _print_problems(path, exc)
        return 1
    print("\n".join(_summary(config)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.server import serve

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
        from gateway.workers import supervise

        return asyncio.run(supervise(path, count))
    asyncio.run(serve(path))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging
    from gateway.workers import serve_worker

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


def cmd_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gateway.keys import fingerprint

    if args.bits < 2048:
        print("gateway keygen: --bits must be at least 2048", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path = out_dir / f"{args.name}.private.pem"
    public_path = out_dir / f"{args.name}.public.pem"
    for existing in (private_path, public_path):
        if existing.exists():
            print(f"gateway keygen: {existing} exists; not overwriting", file=sys.stderr)
            return 1
    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
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
    return 0


def cmd_token_mint(args: argparse.Namespace) -> int:
    import jwt

    try:
        private_key = Path(args.private_key).read_bytes()
    except OSError as exc:
        print(f"gateway token mint: {args.private_key}: {exc.strerror}", file=sys.stderr)
        return 1
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
    print(jwt.encode(claims, private_key, algorithm=args.alg, headers=headers))
    return 0


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from gateway.config import load_settings
    from gateway.inspect import decode_unverified, verdict
    from gateway.logs import utc_timestamp

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
    from gateway.demo import run_demo
    from gateway.logs import configure_logging

    configure_logging("WARNING")
    asyncio.run(run_demo(args.listen, args.admin_listen, args.upstream_port))
    return 0


def cmd_sample_upstream(args: argparse.Namespace) -> int:
    from gateway.sample_upstream import run_sample_upstream

    run_sample_upstream(args.listen)
    return 0


def _workers_argument(value: str) -> int | str:
    if value == "auto":
        return value
    count = int(value)
    if not 1 <= count <= 256:
        raise argparse.ArgumentTypeError("from 1 to 256, or auto")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve with a config until SIGTERM/SIGINT")
    run.add_argument("-c", "--config", help="config file (or GATEWAY_CONFIG)")
    run.add_argument(
        "--workers", type=_workers_argument, help="worker processes, or auto (overrides config)"
    )
    run.set_defaults(func=cmd_run)

    # Started by `run` for each worker; not for direct use.
    worker = commands.add_parser("worker")
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--admin-port-file", required=True)
    worker.set_defaults(func=cmd_worker)

    check = commands.add_parser("check-config", help="validate a config and summarise it")
    check.add_argument("-c", "--config", help="config file (or GATEWAY_CONFIG)")
    check.set_defaults(func=cmd_check_config)

    keygen = commands.add_parser("keygen", help="write an RSA key pair for a customer backend")
    keygen.add_argument("--bits", type=int, default=2048)
    keygen.add_argument("--out-dir", default=".")
    keygen.add_argument("--name", default="sdk-auth")
    keygen.set_defaults(func=cmd_keygen)

    token = commands.add_parser("token", help="mint or inspect SDK tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    mint = token_commands.add_parser("mint", help="print a signed JWT in the contract's shape")
    mint.add_argument("--private-key", required=True)
    mint.add_argument("--user", required=True)
    mint.add_argument("--user-key", default="uid")
    mint.add_argument("--ttl", type=int, default=3600, help="seconds; negative mints expired")
    mint.add_argument("--alg", default="RS256", choices=["RS256", "RS384", "RS512"])
    mint.add_argument("--kid")
    mint.add_argument("--aud")
    mint.add_argument("--iss")
    mint.set_defaults(func=cmd_token_mint)
    inspect = token_commands.add_parser(
        "inspect", help="print a token's header and claims, and the gateway's verdict"
    )
    inspect.add_argument("token", help="the token, or - to read it from stdin")
    inspect.add_argument("-c", "--config", help="config file (or GATEWAY_CONFIG)")
    inspect.add_argument("--project", help="the project the token is for")
    inspect.add_argument("--user", help="the user the request names (JSON map for id_map)")
    inspect.add_argument("--at", type=float, help="judge as of this epoch time (default now)")
    inspect.set_defaults(func=cmd_token_inspect)

    demo = commands.add_parser(
        "demo", help="sample tracking API + gateway on generated keys, with curl commands"
    )
    demo.add_argument("--listen", default="127.0.0.1:8080")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090")
    demo.add_argument("--upstream-port", type=int, default=8000)
    demo.set_defaults(func=cmd_demo)

    sample = commands.add_parser("sample-upstream", help="run the bundled sample tracking API")
    sample.add_argument("--listen", default="127.0.0.1:8000")
    sample.set_defaults(func=cmd_sample_upstream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.sockets import StartupError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except StartupError as exc:  # one line naming what failed, never a traceback
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
