"""The README's commands on a fresh copy of the repository: `make examples` makes every example
config pass `check-config`, and `make run` serves, or stops with one line when the sample
tracking API cannot listen. Each runs `make` as a user would, in a copy holding only the files
git tracks, with this checkout's virtual environment (marked up to date, so nothing installs)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


@pytest.fixture
def fresh_copy(tmp_path: Path) -> Path:
    """The tracked files only, as a clone has them (modification times kept, so `make` sees
    the virtual environment as newer than pyproject.toml)."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    copy = tmp_path / "repo"
    for name in filter(None, tracked):
        source = ROOT / name.decode()
        if source.is_file():
            target = copy / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return copy


def make(*targets: str) -> list[str]:
    """`make` with this checkout's venv, never reinstalling it."""
    return [
        "make",
        "-s",
        f"VENV={VENV}",
        "-o",
        f"{VENV}/.runtime-installed",
        *targets,
    ]


@pytest.mark.skipif(not (VENV / "bin" / "gateway").exists(), reason="needs the project's .venv")
def test_make_examples_makes_every_example_config_pass_check_config(fresh_copy: Path) -> None:
    result = subprocess.run(
        make("examples"), check=False, cwd=fresh_copy, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    examples = sorted(p.name for p in (fresh_copy / "config").glob("*.yaml"))
    assert len(examples) >= 6
    assert result.stdout.splitlines() == [f"config/{name}: OK" for name in examples]
    secrets = (fresh_copy / "config" / "examples.env").read_text()
    assert "SHOP_EU_KEY_7_SECRET=" in secrets
    # Run again: nothing is regenerated, and every config still passes.
    again = subprocess.run(
        make("examples"), check=False, cwd=fresh_copy, capture_output=True, text=True
    )
    assert again.returncode == 0
    assert (fresh_copy / "config" / "examples.env").read_text() == secrets


@pytest.mark.skipif(not (VENV / "bin" / "gateway").exists(), reason="needs the project's .venv")
def test_make_run_stops_when_the_sample_api_cannot_listen(
    fresh_copy: Path, busy_address: str
) -> None:
    result = subprocess.run(
        make("run", f"SAMPLE_API={busy_address}"),
        check=False,
        cwd=fresh_copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert f"gateway: cannot listen on {busy_address}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not (VENV / "bin" / "gateway").exists(), reason="needs the project's .venv")
async def test_make_run_serves_the_embedded_defaults(fresh_copy: Path) -> None:
    sample, listen, admin = (f"127.0.0.1:{free_port()}" for _ in range(3))
    env = {**os.environ, "GATEWAY_LISTEN": listen, "GATEWAY_ADMIN_LISTEN": admin}
    process = await asyncio.create_subprocess_exec(
        *make("run", f"SAMPLE_API={sample}"),
        cwd=fresh_copy,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its own process group: make, the sample API and the gateway
    )
    try:
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                async with http.get(f"http://{admin}/readyz") as response:
                    return response.status == 200

            await eventually(ready, "make run to serve", seconds=60)
            url = f"http://{listen}/track/v2/projects/demo/customers/events"
            async with http.post(url, json={"customer_ids": {"cookie": "c-1"}}) as response:
                assert response.status == 200
                assert await response.json() == {"success": True}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        await process.wait()
