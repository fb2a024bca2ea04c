"""What the deploy/ tests share: the paths, YAML reading, commands that must succeed, and the
gateway's own validation of a config with generated keys."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config.settings import LoadedConfig, parse_settings, read_yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
KUBERNETES = DEPLOY / "kubernetes"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{output}"
    return output


def public_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def clean_env(**extra: str) -> dict[str, str]:
    """No inherited variable may leak into `${NAME}` substitution."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


def validate_gateway_config(
    text: str, tmp_path: Path, key_files: dict[str, bytes], env: dict[str, str]
) -> LoadedConfig:
    """Schema (parse_settings), then the whole of `gateway check-config` (keys included) on a
    copy in tmp_path with `key_files` written beside it."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text, encoding="utf-8")
    loaded = parse_settings(read_yaml(config), config, env)
    for relative, content in key_files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    output = run(sys.executable, "-m", "gateway", "check-config", "-c", str(config), env=env)
    assert "warning" not in output.lower(), output
    return loaded


def pem_files(loaded: LoadedConfig) -> set[str]:
    settings = loaded.settings
    projects = [settings.defaults, *settings.projects.values()]
    return {key.pem_file for p in projects for key in p.keys if key.pem_file is not None}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: it comes with the Debian package `prometheus` "
            "(apt-get install -y prometheus)",
            pytrace=False,
        )
    return path
