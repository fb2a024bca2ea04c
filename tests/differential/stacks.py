"""The real upstream stacks of tests/test_differential.py: how each is built, started and asked
for what it read.

Go and C servers are compiled at test time and kept under tests/differential/.cache, keyed by a
hash of their source and the compiler's version, so only the first run builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = HERE / ".cache"


class Unavailable(Exception):
    """This stack cannot be had on this machine; the message says why."""


def _version(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _cached_build(name: str, sources: list[Path], toolchain: str, build: list[str]) -> Path:
    """The binary built from `sources`, built once per source and toolchain version.
    `build` is the compiler's command; "{out}" in it is replaced by the output path."""
    digest = hashlib.sha256(toolchain.encode())
    for source in sources:
        digest.update(source.read_bytes())
    binary = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        out = Path(scratch) / name
        env = {
            **os.environ,
            "GOCACHE": str(CACHE / "go-build"),
            "GOPATH": str(CACHE / "gopath"),
            "GOFLAGS": "",
            "GOTOOLCHAIN": "local",
            "GOPROXY": "off",
            "GO111MODULE": "off",
        }
        done = subprocess.run(
            [part.replace("{out}", str(out)) for part in build],
            capture_output=True,
            text=True,
            env=env,
            cwd=sources[0].parent,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"building {name} failed:\n{done.stdout}{done.stderr}")
        out.replace(binary)  # atomic: a concurrent run sees the whole binary or none
    return binary


def go_command() -> list[str]:
    go = shutil.which("go")
    if go is None:
        raise Unavailable("no `go` on PATH (Debian: golang-go; `make test` installs it)")
    source = HERE / "go_server" / "main.go"
    version = _version([go, "version"])
    return [
        str(_cached_build("go_server", [source], version, [go, "build", "-o", "{out}", "main.go"]))
    ]


def c_command() -> list[str]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise Unavailable("no C compiler on PATH (Debian: gcc; `make test` installs it)")
    if not Path("/usr/include/cjson/cJSON.h").exists():
        raise Unavailable("no cJSON headers (Debian: libcjson-dev; `make test` installs it)")
    source = HERE / "c_server.c"
    version = _version([cc, "--version"]) + Path("/usr/include/cjson/cJSON.h").read_text()
    build = [cc, "-O1", "-o", "{out}", "c_server.c", "-lcjson", "-lpthread"]
    return [str(_cached_build("c_server", [source], version, build))]


def node_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise Unavailable("no `node` on PATH (Debian: nodejs; `make test` installs it)")
    for package in ("body-parser", "qs"):
        if not (HERE / "node_modules" / package).is_dir():
            raise Unavailable(f"no {package} in tests/differential/node_modules (`make test`)")
    return [node, str(HERE / "node_server.js")]


def django_command() -> list[str]:
    if importlib.util.find_spec("django") is None:
        raise Unavailable("Django is not installed (`make test` installs the dev extras)")
    return [sys.executable, "-m", "tests.differential.django_app"]


def python_command() -> list[str]:
    return [sys.executable, "-m", "tests.differential.python_json"]


STACKS: dict[str, Callable[[], list[str]]] = {
    "python-json": python_command,
    "django": django_command,
    "node": node_command,
    "go": go_command,
    "c-cjson": c_command,
}


def command_or_reason(name: str) -> list[str] | str:
    """The command that starts stack `name` (built if need be), or why it cannot be had."""
    try:
        return STACKS[name]()
    except Unavailable as unavailable:
        return str(unavailable)


@dataclass
class RunningStack:
    name: str
    url: str
    process: asyncio.subprocess.Process

    async def records(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/__records") as answer,
        ):
            raw = await answer.read()
        records: list[dict[str, Any]] = json.loads(raw.decode("utf-8", "replace"))
        return records


@contextlib.asynccontextmanager
async def started(
    name: str, command: list[str], routes: dict[str, Any]
) -> AsyncIterator[RunningStack]:
    """Stack `name` serving on a loopback port it chose, stopped on exit."""
    with tempfile.TemporaryFile() as errors:
        process = await asyncio.create_subprocess_exec(
            *command,
            json.dumps(routes),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
        )
        try:
            assert process.stdout is not None
            async with asyncio.timeout(30):
                line = await process.stdout.readline()
            if not line.strip().isdigit():
                errors.seek(0)
                raise AssertionError(
                    f"{name} did not start: {errors.read().decode(errors='replace')}"
                )
            yield RunningStack(name, f"http://127.0.0.1:{int(line)}", process)
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    async with asyncio.timeout(10):
                        await process.wait()
                except TimeoutError:
                    process.kill()
                    await process.wait()
