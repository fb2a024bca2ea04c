"""The two builds of the package: the pure-Python wheel that `pip install` makes anywhere, and
the compiled one (the request path's modules compiled by mypyc) that the container image ships
and `make test` runs the request path's tests against (GATEWAY_EXPECT_COMPILED=1)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

import gateway
from tests.conftest import COMPILED

ROOT = Path(__file__).resolve().parent.parent
EXPECT_COMPILED = os.environ.get("GATEWAY_EXPECT_COMPILED") == "1"
# The modules every request runs through: each must be compiled in the compiled build.
REQUEST_PATH = (
    "gateway.pipeline",
    "gateway.auth.verify",
    "gateway.auth.verified",
    "gateway.auth.jsonstrict",
    "gateway.auth.extract",
    "gateway.http.connection",
    "gateway.http.parsing",
    "gateway.http.client",
    "gateway.forwarding.headers",
    "gateway.stages.forward",
    "gateway.telemetry.logs",
    "gateway.config.projects",
    "gateway.config.router",
    "gateway.config.routes",
)
# Made once a request or more. mypyc compiles an __init__ written in the class, not the one
# @dataclass generates at import, which runs as Python (four times slower).
PER_REQUEST_CLASSES = (
    "gateway.stages.exchange.Exchange",
    "gateway.stages.authenticate.Checked",
    "gateway.stages.authenticate.Attempt",
    "gateway.stages.forward.Outgoing",
    "gateway.auth.extract.RequestParts",
    "gateway.auth.extract.FoundToken",
    "gateway.auth.body.JsonBody",
    "gateway.forwarding.headers.Forwarding",
    "gateway.http.messages.Response",
    "gateway.http.client.Answer",
)


def test_the_suite_runs_the_build_it_was_asked_to() -> None:
    assert EXPECT_COMPILED == COMPILED, f"gateway imported from {gateway.__file__}"


def test_the_default_wheel_is_pure_python(tmp_path: Path) -> None:
    """What `pip install` builds without HATCH_BUILD_HOOK_ENABLE_MYPYC: no compiler needed."""
    built = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "--target", "wheel", "--directory", tmp_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("HATCH_BUILD")},
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gateway/pipeline.py" in names
    assert not [name for name in names if name.endswith((".so", ".pyd", ".c"))]


@pytest.mark.skipif(not EXPECT_COMPILED, reason="runs against the compiled build (make test)")
def test_the_compiled_build_runs_the_request_path_as_extension_modules() -> None:
    for name in REQUEST_PATH:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        assert module.__file__ is not None
        assert not module.__file__.endswith(".py"), f"{name} is not compiled: {module.__file__}"
    # And so does a `gateway` process started as the tests start it.
    started = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert started.stdout.rstrip().endswith("(compiled)"), started.stdout


@pytest.mark.skipif(not EXPECT_COMPILED, reason="runs against the compiled build (make test)")
def test_the_objects_made_per_request_are_built_by_compiled_code() -> None:
    for path in PER_REQUEST_CLASSES:
        module_name, _, class_name = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        assert not isinstance(cls.__init__, types.FunctionType), f"{path}.__init__ runs as Python"
