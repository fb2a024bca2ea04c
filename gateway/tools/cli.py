"""The `gateway` command: its parser, `main`, and the commands that serve or read a config
(`run`, `check-config`, `config-schema`, `demo`, `sample-upstream`, and the internal `worker`).
The key and token commands are in `gateway.tools.token_commands`. Nothing else imports this
module.

Each command imports what it uses when it runs: `gateway token mint` and `--help` start without
loading the config schema or the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.tools.config_file import config_path, load, print_problems
from gateway.tools.token_commands import add_inspect, add_keygen, add_mint

if TYPE_CHECKING:
    from gateway.config.compiled import CompiledConfig


# --- the serving and config commands -----------------------------------------------------------


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

    path = config_path(args)
    try:
        config = load(path)
    except ConfigError as exc:
        print_problems(path, exc)
        return 1
    print("\n".join(_summary(config)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.config.settings import ConfigError
    from gateway.runtime.process import serve
    from gateway.telemetry.logs import configure_logging

    configure_logging()
    path = config_path(args)
    try:
        config = load(path)
    except ConfigError as exc:
        print_problems(path, exc)
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


# --- the parser --------------------------------------------------------------------------------

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
            print(f"gateway {version(DISTRIBUTION)} ({installed_build()})")
        except PackageNotFoundError:
            parser.exit(2, f"gateway: {DISTRIBUTION} is not installed (pip install -e .)\n")
        parser.exit()


def installed_build() -> str:
    """Which build is installed: the request path compiled by mypyc (the wheel built with
    HATCH_BUILD_HOOK_ENABLE_MYPYC=1), or pure Python."""
    spec = find_spec("gateway.pipeline")
    origin = spec.origin if spec is not None else None
    return "pure Python" if origin is None or origin.endswith(".py") else "compiled"


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
    _add_run(_command(commands, "run", "serve with a config until SIGTERM/SIGINT"))
    _add_check_config(_command(commands, "check-config", "validate a config and summarise it"))
    _add_config_schema(
        _command(
            commands,
            "config-schema",
            "print the JSON Schema of the config file, for editors and CI",
        )
    )
    add_keygen(
        _command(commands, "keygen", "write a key pair for a customer backend to sign tokens with")
    )
    _add_token(_command(commands, "token", "mint or inspect SDK tokens"))
    _add_demo(
        _command(
            commands, "demo", "sample tracking API + gateway on generated keys, with curl commands"
        )
    )
    _add_sample_upstream(
        _command(commands, "sample-upstream", "run the bundled sample tracking API")
    )
    return parser


def _add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("-c", "--config", help=CONFIG_HELP)
    run.add_argument(
        "--workers",
        type=_workers_argument,
        help="worker processes, or auto for one per CPU (default: the config's workers)",
    )
    run.set_defaults(func=cmd_run)


def _add_check_config(check: argparse.ArgumentParser) -> None:
    check.add_argument("-c", "--config", help=CONFIG_HELP)
    check.set_defaults(func=cmd_check_config)


def _add_config_schema(schema: argparse.ArgumentParser) -> None:
    schema.set_defaults(func=cmd_config_schema)


def _add_token(token: argparse.ArgumentParser) -> None:
    """`gateway token`: the group of `mint` and `inspect`."""
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    add_mint(_command(token_commands, "mint", "print a signed JWT in the contract's shape"))
    add_inspect(
        _command(
            token_commands,
            "inspect",
            "print a token's header and claims, and the gateway's verdict",
        )
    )


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--listen", default="127.0.0.1:8080", help="the gateway's address")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090", help="the admin address")
    demo.add_argument("--upstream-port", type=int, default=8000, help="the sample API's port")
    demo.set_defaults(func=cmd_demo)


def _add_sample_upstream(sample: argparse.ArgumentParser) -> None:
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
