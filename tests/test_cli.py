"""The `gateway` command, run as a real subprocess (`python -m gateway`).

Servers run on free loopback ports; every wait polls with a deadline, and every process started
here is killed and reaped in a `finally`, whatever the test's outcome.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import http.client
import importlib.metadata
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.config.settings import Settings
from gateway.tools.cli import build_parser
from tests.conftest import (
    COMPILED,
    EXAMPLES,
    KeyPair,
    base_config,
    eventually_sync,
    free_port,
    log_records,
    write_config,
)
from tests.test_docs import INTERNAL_REFERENCE

REPO = Path(__file__).resolve().parents[1]
DEADLINE_SECONDS = 20.0
EVENTS = "/track/v2/projects/app/customers/events"
ANONYMOUS = {"customer_ids": {"cookie": "c-123"}, "event_type": "view"}


# --- running the command -----------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment, with this checkout on the path (after the build PYTHONPATH
    names, when the suite runs against the compiled one) and no stray config."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    env.update(extra)
    return env


def gateway_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_argv(*args),
        cwd=cwd,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON operational log lines the gateway writes on stderr."""
        return log_records(self.stderr(), strict=False)


@contextmanager
def started(argv: list[str], cwd: Path, name: str) -> Iterator[Process]:
    stdout_path, stderr_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        popen = subprocess.Popen(argv, cwd=cwd, env=cli_env(), stdout=out, stderr=err)
        try:
            yield Process(popen, stdout_path, stderr_path)
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait(timeout=DEADLINE_SECONDS)


def wait_for(what: str, condition: Callable[[], bool], process: Process | None = None) -> None:
    """Poll `condition` until it holds; fail at the deadline or as soon as `process` exits."""

    def holds() -> bool:
        if condition():
            return True
        if process is not None and process.popen.poll() is not None:
            pytest.fail(
                f"{what}: the process exited with {process.popen.returncode}\n"
                f"stdout:\n{process.stdout()}\nstderr:\n{process.stderr()}"
            )
        return False

    eventually_sync(holds, what, DEADLINE_SECONDS, interval=0.05, ignoring=())


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_SECONDS)
    try:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, path, body=data, headers={**all_headers, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answers_200(port: int, path: str) -> bool:
    try:
        return request(port, "GET", path)[0] == 200
    except OSError:
        return False


def expected_fingerprint(pair: KeyPair) -> str:
    der = pair.private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def lines_matching(pattern: str, text: str) -> list[int]:
    """Indexes of the lines of `text` that `pattern` matches whole."""
    return [i for i, line in enumerate(text.splitlines()) if re.fullmatch(pattern, line)]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory away from the config, so relative paths prove what they are
    relative to."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def two_project_config(key_b: KeyPair, upstream_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    config = copy.deepcopy(base_config(upstream_url))
    config["projects"]["shop"] = {
        "mode": "monitor",
        "audience": "shop",
        "keys": [{"id": "key-b", "pem": key_b.public_pem}],
    }
    return config


# --- check-config ------------------------------------------------------------------------------


def test_check_config_summarises_a_valid_config(
    tmp_path: Path, workdir: Path, key_a: KeyPair, key_b: KeyPair
) -> None:
    path = write_config(tmp_path, two_project_config(key_b), {"a.pem": key_a})
    result = run_cli("check-config", "-c", str(path), cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    [app] = lines_matching(r"\s+app\s+mode=required\b.*", out)
    [key_a_line] = lines_matching(rf"\s+.*\bkey-a\s+{re.escape(expected_fingerprint(key_a))}", out)
    [shop] = lines_matching(r"\s+shop\s+mode=monitor\b.*", out)
    [key_b_line] = lines_matching(rf"\s+.*\bkey-b\s+{re.escape(expected_fingerprint(key_b))}", out)
    assert app < key_a_line < shop < key_b_line  # each key is listed under its project
    for name, template in [
        ("track-events", "/track/v2/projects/{project}/customers/events"),
        ("track-batch", "/track/v2/projects/{project}/batch"),
        ("sdk-config", "/v2/sdkconfig"),
    ]:
        assert lines_matching(rf"\s+{name}\s+.*{re.escape(template)}.*", out), out
    assert "warning" not in out.lower()
    assert len(out.splitlines()) <= 40  # one screen


def test_check_config_prints_warnings_and_exits_0(
    tmp_path: Path, workdir: Path, key_a: KeyPair, key_b: KeyPair
) -> None:
    config = two_project_config(key_b)
    config["workers"] = 2
    config["projects"]["other"] = {
        "mode": "monitor",
        "keys": [{"id": "k", "pem": key_a.public_pem}],
    }
    path = write_config(tmp_path, config, {"a.pem": key_a})
    result = run_cli("check-config", "-c", str(path), cwd=workdir)
    assert result.returncode == 0, result.stderr
    both = result.stdout + result.stderr
    assert lines_matching(
        r"\s*failure_counter\.backend: memory with more than one worker: .*", both
    ), both
    assert lines_matching(
        r"\s*projects: projects app, other share key .* and app, other set no audience or "
        r"issuer: each accepts the other's tokens",
        both,
    ), both


def test_check_config_lists_every_problem_with_its_path_and_exits_1(
    tmp_path: Path, workdir: Path, key_a: KeyPair
) -> None:
    # A weak key an operator might paste, which the gateway must refuse.
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_pem = (
        small.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    config = copy.deepcopy(base_config("http://127.0.0.1:9"))
    config["projects"]["p1"] = {"mode": "required", "keys": [{"id": "k1", "pem": small_pem}]}
    config["projects"]["app"]["keys"].append({"id": "key-b", "pem_file": "keys/b.pem"})
    config["routes"][1]["name"] = "track-events"
    config["routes"][2]["token"] = [{"json": "token"}]
    path = write_config(tmp_path, config, {"a.pem": key_a})
    result = run_cli("check-config", "-c", str(path), cwd=workdir)
    assert result.returncode == 1
    assert "config OK" not in result.stdout
    for pattern in [
        r"projects\.p1\.keys\[0\]\.pem: RSA key is 1024 bits; at least 2048 required",
        r"projects\.app\.keys\[1\]\.pem_file: keys/b\.pem: no such file",
        r"routes\[0\]\.name: 'track-events' names two routes",
        r"routes\[1\]\.name: 'track-events' names two routes",
        r"routes\[2\]\.token\[0\]: a token is read from a header or query, not json",
    ]:
        assert lines_matching(rf"\s*{pattern}", result.stderr), (pattern, result.stderr)
    assert "Traceback" not in result.stderr


def test_check_config_reads_gateway_config_in_place_of_dash_c(
    tmp_path: Path, workdir: Path, key_a: KeyPair
) -> None:
    config = copy.deepcopy(base_config("http://127.0.0.1:9"))
    path = write_config(tmp_path, config, {"a.pem": key_a})
    env = cli_env(GATEWAY_CONFIG=str(path))
    result = run_cli("check-config", cwd=workdir, env=env)
    assert result.returncode == 0, result.stderr
    assert str(path.resolve()) in result.stdout
    assert lines_matching(r"\s+app\s+mode=required\b.*", result.stdout)

    config["projects"]["app"]["mode"] = "requird"
    write_config(tmp_path, config, {"a.pem": key_a})
    result = run_cli("check-config", cwd=workdir, env=env)
    assert result.returncode == 1
    assert lines_matching(r"\s*projects\.app\.mode: .* \(got 'requird'\)", result.stderr)


def test_check_config_without_any_config_says_how_to_give_one(workdir: Path) -> None:
    result = run_cli("check-config", cwd=workdir)
    assert result.returncode != 0
    assert "GATEWAY_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr


# --- run: refusing -----------------------------------------------------------------------------


def test_run_refuses_an_invalid_config_and_prints_every_problem(
    tmp_path: Path, workdir: Path, key_a: KeyPair
) -> None:
    config = copy.deepcopy(base_config("http://127.0.0.1:9"))
    config["listen"] = f"127.0.0.1:{free_port()}"
    config["admin_listen"] = f"127.0.0.1:{free_port()}"
    config["projects"]["app"]["mode"] = "requird"
    config["projects"]["app"]["audience"] = "${APP_AUDIENCE_FOR_CLI_TEST}"
    config["upstream"]["url"] = "ftp://tracking.example"
    path = write_config(tmp_path, config, {"a.pem": key_a})
    result = run_cli("run", "-c", str(path), cwd=workdir)
    assert result.returncode != 0
    for pattern in [
        r"projects\.app\.mode: .* \(got 'requird'\)",
        r"projects\.app\.audience: environment variable APP_AUDIENCE_FOR_CLI_TEST is not set",
        r"upstream\.url: expected http\(s\)://.* \(got 'ftp://tracking\.example'\)",
    ]:
        assert lines_matching(rf"\s*{pattern}", result.stderr), (pattern, result.stderr)
    assert "Traceback" not in result.stderr


# --- keygen ------------------------------------------------------------------------------------


def test_keygen_writes_a_private_and_a_public_pem(workdir: Path) -> None:
    out_dir = workdir / "keys" / "new"
    result = run_cli("keygen", "--out-dir", str(out_dir), "--name", "acme", cwd=workdir)
    assert result.returncode == 0, result.stderr
    private_path, public_path = out_dir / "acme.private.pem", out_dir / "acme.public.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    public = serialization.load_pem_public_key(public_path.read_bytes())
    assert isinstance(private, rsa.RSAPrivateKey)
    assert isinstance(public, rsa.RSAPublicKey)
    assert private.key_size == 2048
    assert public.public_numbers() == private.public_key().public_numbers()
    assert b"PRIVATE" not in public_path.read_bytes()
    assert expected_fingerprint(KeyPair(private)) in result.stdout


def test_keygen_never_overwrites(workdir: Path) -> None:
    first = run_cli("keygen", "--out-dir", str(workdir), "--name", "acme", cwd=workdir)
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in workdir.glob("acme.*.pem")}
    again = run_cli("keygen", "--out-dir", str(workdir), "--name", "acme", cwd=workdir)
    assert again.returncode != 0
    assert "exists" in again.stderr
    assert {p.name: p.read_bytes() for p in workdir.glob("acme.*.pem")} == before

    (workdir / "solo.public.pem").write_text("kept\n")  # only one half of a pair is there
    half = run_cli("keygen", "--out-dir", str(workdir), "--name", "solo", cwd=workdir)
    assert half.returncode != 0
    assert (workdir / "solo.public.pem").read_text() == "kept\n"
    assert not (workdir / "solo.private.pem").exists()


def test_keygen_refuses_fewer_than_2048_bits(workdir: Path) -> None:
    result = run_cli("keygen", "--bits", "1024", "--out-dir", str(workdir), cwd=workdir)
    assert result.returncode != 0
    assert "2048" in result.stderr
    assert list(workdir.glob("*.pem")) == []


# --- token mint --------------------------------------------------------------------------------


def write_private_key(directory: Path, pair: KeyPair) -> Path:
    path = directory / "customer.private.pem"
    path.write_bytes(pair.private_pem)
    return path


def test_token_mint_prints_a_jwt_in_the_contract_shape(
    workdir: Path, key_a: KeyPair, key_b: KeyPair
) -> None:
    key_file = write_private_key(workdir, key_a)
    before = int(time.time())
    result = run_cli(
        "token",
        "mint",
        "--private-key",
        str(key_file),
        "--user",
        "alice",
        "--kid",
        "key-a",
        "--ttl",
        "600",
        cwd=workdir,
    )
    after = int(time.time())
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": "key-a", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == {"key": "uid", "value": "alice"}
    assert before <= claims["iat"] <= after
    assert claims["exp"] == claims["iat"] + 600
    # PyJWT checks `sub` is a string by default; the contract's `sub` is a {key, value} map.
    verified = jwt.decode(
        token, key_a.public_pem, algorithms=["RS256"], options={"verify_sub": False}
    )
    assert verified == claims
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, key_b.public_pem, algorithms=["RS256"], options={"verify_sub": False})


def test_token_mint_takes_user_key_and_algorithm(workdir: Path, key_a: KeyPair) -> None:
    key_file = write_private_key(workdir, key_a)
    result = run_cli(
        "token",
        "mint",
        "--private-key",
        str(key_file),
        "--user",
        "bob",
        "--user-key",
        "registered",
        "--alg",
        "RS512",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token) == {"alg": "RS512", "typ": "JWT"}
    claims = jwt.decode(
        token, key_a.public_pem, algorithms=["RS512"], options={"verify_sub": False}
    )
    assert claims["sub"] == {"key": "registered", "value": "bob"}
    assert claims["exp"] == claims["iat"] + 3600


def test_token_mint_with_a_negative_ttl_mints_an_expired_token(
    workdir: Path, key_a: KeyPair
) -> None:
    key_file = write_private_key(workdir, key_a)
    result = run_cli(
        "token",
        "mint",
        "--private-key",
        str(key_file),
        "--user",
        "alice",
        "--kid",
        "key-a",
        "--ttl",
        "-300",
        cwd=workdir,
    )
    after = int(time.time())
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(token, key_a.public_pem, algorithms=["RS256"], options={"verify_sub": False})
    claims = jwt.decode(
        token,
        key_a.public_pem,
        algorithms=["RS256"],
        options={"verify_sub": False, "verify_exp": False},
    )  # the signature is good: the token is expired, not forged
    assert claims["exp"] <= after - 300
    assert claims["iat"] <= claims["exp"]


# --- run: serving ------------------------------------------------------------------------------


@dataclass
class Served:
    gateway: Process
    config: dict[str, Any]
    config_path: Path
    public_port: int
    admin_port: int
    upstream_port: int

    def readyz(self) -> dict[str, Any]:
        status, body = request(self.admin_port, "GET", "/readyz")
        assert status == 200, body
        parsed: dict[str, Any] = json.loads(body)
        return parsed

    def upstream_records(self) -> list[dict[str, Any]]:
        status, body = request(self.upstream_port, "GET", "/_sample/requests")
        assert status == 200
        records: list[dict[str, Any]] = json.loads(body)
        return records

    def last_forwarded_headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.upstream_records()[-1]["headers"]}

    def rewrite_config(self, edit: Callable[[dict[str, Any]], None], key_a: KeyPair) -> None:
        config = copy.deepcopy(self.config)
        edit(config)
        write_config(self.config_path.parent, config, {"a.pem": key_a})


@contextmanager
def serving(
    config_dir: Path,
    workdir: Path,
    edit: Callable[[dict[str, Any]], None],
    keys: dict[str, KeyPair],
) -> Iterator[Served]:
    """The sample upstream and `gateway run` on the base config after `edit`, each a
    subprocess on free loopback ports."""
    upstream_port = free_port()
    upstream_argv = gateway_argv("sample-upstream", "--listen", f"127.0.0.1:{upstream_port}")
    with started(upstream_argv, workdir, "upstream") as upstream:
        wait_for(
            "the sample upstream answers",
            lambda: answers_200(upstream_port, "/_sample/requests"),
            upstream,
        )
        config = copy.deepcopy(base_config(f"http://127.0.0.1:{upstream_port}"))
        public_port, admin_port = free_port(), free_port()
        config["listen"] = f"127.0.0.1:{public_port}"
        config["admin_listen"] = f"127.0.0.1:{admin_port}"
        edit(config)
        path = write_config(config_dir, config, keys)
        with started(gateway_argv("run", "-c", str(path)), workdir, "gateway") as gateway:
            wait_for("/readyz answers 200", lambda: answers_200(admin_port, "/readyz"), gateway)
            yield Served(gateway, config, path, public_port, admin_port, upstream_port)


@pytest.fixture
def served(tmp_path: Path, workdir: Path, key_a: KeyPair) -> Iterator[Served]:
    with serving(tmp_path, workdir, lambda config: None, {"a.pem": key_a}) as running:
        yield running


def stop_with_sigterm(served: Served) -> int:
    served.gateway.popen.send_signal(signal.SIGTERM)
    return served.gateway.popen.wait(timeout=DEADLINE_SECONDS)


def test_run_serves_until_sigterm_then_exits_0(
    served: Served, workdir: Path, key_a: KeyPair
) -> None:
    status, body = request(served.public_port, "POST", EVENTS, ANONYMOUS)
    assert (status, json.loads(body)) == (200, {"success": True})
    assert served.last_forwarded_headers()["x-auth-status"] == "anonymous"

    # A token from `gateway token mint` is one the running gateway verifies.
    minted = run_cli(
        "token",
        "mint",
        "--private-key",
        str(write_private_key(workdir, key_a)),
        "--user",
        "alice",
        "--kid",
        "key-a",
        cwd=workdir,
    )
    assert minted.returncode == 0, minted.stderr
    identified = {"customer_ids": {"registered": "alice"}, "event_type": "purchase"}
    token_header = {"X-Sdk-Auth-Token": minted.stdout.strip()}
    status, _ = request(served.public_port, "POST", EVENTS, identified, token_header)
    assert status == 200
    forwarded = served.last_forwarded_headers()
    assert forwarded["x-auth-status"] == "verified"
    assert forwarded["x-authenticated-user"] == "alice"

    # The admin endpoints live on the admin port only.
    status, _ = request(served.public_port, "GET", "/readyz")
    assert status == 404

    assert stop_with_sigterm(served) == 0
    assert "Traceback" not in served.gateway.stderr()
    with pytest.raises(ConnectionRefusedError):  # the listener is closed
        request(served.public_port, "POST", EVENTS, ANONYMOUS)


def test_sighup_and_reload_keep_the_running_config_when_the_new_one_is_invalid(
    served: Served, key_a: KeyPair
) -> None:
    digest = served.readyz()["config_digest"]
    identified = {"customer_ids": {"registered": "alice"}, "event_type": "purchase"}
    status, body = request(served.public_port, "POST", EVENTS, identified)
    assert status == 401  # required: an identified request without a token
    assert json.loads(body)["error"]["code"] == "TOKEN_NOT_PROVIDED"

    def break_it(config: dict[str, Any]) -> None:
        config["projects"]["app"]["mode"] = "requird"

    served.rewrite_config(break_it, key_a)
    served.gateway.popen.send_signal(signal.SIGHUP)

    def refusal_logged() -> bool:
        return any(
            r.get("message") == "reload refused"
            and re.fullmatch(r"projects\.app\.mode: .* \(got 'requird'\)", str(r.get("problem")))
            for r in served.gateway.log_records()
        )

    wait_for("SIGHUP's refusal is logged with the YAML path", refusal_logged, served.gateway)
    assert served.readyz()["config_digest"] == digest  # still serving the old config
    assert request(served.public_port, "POST", EVENTS, ANONYMOUS)[0] == 200

    status, body = request(served.admin_port, "POST", "/-/reload")
    assert status == 422
    refused = json.loads(body)
    assert refused["config_digest"] == digest
    assert [p for p in refused["problems"] if re.fullmatch(r"projects\.app\.mode: .*", p)], refused
    assert all(re.fullmatch(r"[A-Za-z0-9_.\[\]-]+: .+", p) for p in refused["problems"]), refused
    assert served.readyz()["config_digest"] == digest

    def monitor_it(config: dict[str, Any]) -> None:
        config["projects"]["app"]["mode"] = "monitor"

    served.rewrite_config(monitor_it, key_a)
    status, body = request(served.admin_port, "POST", "/-/reload")
    assert status == 200, body
    new_digest = json.loads(body)["config_digest"]
    assert re.fullmatch(r"[0-9a-f]{16,}", new_digest)
    assert new_digest != digest
    assert served.readyz()["config_digest"] == new_digest
    # The new config is the one deciding: monitor forwards what required refused.
    status, _ = request(served.public_port, "POST", EVENTS, identified)
    assert status == 200
    assert served.last_forwarded_headers()["x-auth-status"] == "unverified"

    assert stop_with_sigterm(served) == 0


def test_token_inspect_gives_the_gateways_verdict(
    tmp_path: Path, workdir: Path, key_a: KeyPair, key_b: KeyPair
) -> None:
    config = base_config("http://127.0.0.1:9")
    config["projects"]["app"]["keys"] = [{"id": "k1", "pem_file": "keys/a.pem"}]
    path = write_config(tmp_path, config, {"a.pem": key_a, "b.pem": key_b})
    key_file = write_private_key(workdir, key_a)
    mint = ("token", "mint", "--private-key", str(key_file), "--user", "alice", "--kid", "k1")
    minted = run_cli(*mint, cwd=workdir)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    inspect = ("token", "inspect", "-c", str(path), "--project", "app")
    from_stdin = subprocess.run(
        gateway_argv(*inspect, "--user", "alice", "-"),
        input=token,
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert '"kid": "k1"' in from_stdin.stdout
    assert 'verdict: VERIFIED user="alice" key=k1' in from_stdin.stdout
    later = str(time.time() + 7200)
    expired = run_cli(*inspect, "--at", later, token, cwd=workdir)
    assert expired.returncode == 3
    assert "verdict: TOKEN_EXPIRED (reason: expired)" in expired.stdout
    other = run_cli(*inspect, "--user", "bob", token, cwd=workdir)
    assert "verdict: TOKEN_REJECTED (reason: subject_mismatch)" in other.stdout
    garbage = run_cli("token", "inspect", "not-a-token", cwd=workdir)
    assert garbage.returncode == 0
    assert "3 dot-separated parts" in garbage.stdout


def test_demo_serves_what_it_prints(workdir: Path) -> None:
    ports = [free_port() for _ in range(3)]
    argv = gateway_argv(
        "demo",
        "--listen",
        f"127.0.0.1:{ports[0]}",
        "--admin-listen",
        f"127.0.0.1:{ports[1]}",
        "--upstream-port",
        str(ports[2]),
    )
    with started(argv, workdir, "demo") as demo:
        wait_for("the curl lines", lambda: "subject_mismatch" in demo.stdout(), demo)
        lines = demo.stdout().splitlines()
        verified = lines[lines.index("# alice with her token: verified") + 1]
        token = verified.split("Authorization: Bearer ")[1].split("'")[0]
        status, _ = request(
            ports[0],
            "POST",
            "/track/v2/projects/demo/customers/events",
            {"customer_ids": {"registered": "alice"}},
            {"Authorization": f"Bearer {token}"},
        )
        assert status == 200
        demo.popen.send_signal(signal.SIGTERM)
        assert demo.popen.wait(timeout=DEADLINE_SECONDS) == 0


# --- help, version, config schema ---------------------------------------------------------------


def test_version_is_the_installed_package_version_and_build(workdir: Path) -> None:
    result = run_cli("--version", cwd=workdir)
    assert result.returncode == 0, result.stderr
    version = importlib.metadata.version("ingestion-gateway")
    build = "compiled" if COMPILED else "pure Python"
    assert result.stdout == f"gateway {version} ({build})\n"


def test_top_level_help_describes_the_product_and_hides_the_worker_command(
    workdir: Path,
) -> None:
    result = run_cli("--help", cwd=workdir)
    assert result.returncode == 0, result.stderr
    usage, _, rest = result.stdout.partition("\n\n")
    assert usage == "usage: gateway [-h] [--version] COMMAND ..."
    description = " ".join(rest.partition("\n\n")[0].split())
    assert description.startswith("SDK-authentication gateway for mobile-analytics tracking APIs")
    assert "gateway demo" in description
    assert len(re.findall(r"[.!?](?:\s|$)", description)) <= 2  # one or two sentences
    for name in ("run", "check-config", "config-schema", "keygen", "token", "demo"):
        assert lines_matching(rf"\s+{name}\s+\S.*|\s+{name}", result.stdout), name
    unknown = run_cli("nope", cwd=workdir)
    assert unknown.returncode == 2
    for text in (result.stdout, unknown.stderr):
        assert "worker" not in text
        assert not INTERNAL_REFERENCE.search(text)


def command_parsers() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command's parser with the words that reach it, `gateway` itself first."""
    found: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []

    def walk(words: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
        found.append((words, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk((*words, name), child)

    walk((), build_parser())
    return found


def help_entries(text: str) -> dict[str, str]:
    """The help text of each option and positional in `--help` output, by its first name."""
    entries: dict[str, str] = {}
    name: str | None = None
    for line in text.splitlines():
        if re.match(r"  \S", line):
            invocation, _, rest = line.strip().partition("  ")
            name = invocation.split()[0].rstrip(",")
            entries[name] = rest.strip()
        elif name is not None and line.startswith("   "):
            entries[name] = f"{entries[name]} {line.strip()}".strip()
        else:
            name = None
    return entries


@pytest.mark.parametrize(
    "words",
    [pytest.param(words, id=" ".join(words) or "gateway") for words, _ in command_parsers()],
)
def test_every_option_has_help_and_shows_its_default(workdir: Path, words: tuple[str, ...]) -> None:
    parser = dict(command_parsers())[words]
    result = run_cli(*words, "--help", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert not INTERNAL_REFERENCE.search(result.stdout)
    entries = help_entries(result.stdout)
    one_of = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert entries.get(name), (name, result.stdout)
        needs_default = not (
            action.required or action in one_of or action.default is argparse.SUPPRESS
        )
        if action.option_strings and needs_default:
            assert "(default: " in entries[name], (name, entries[name])


def test_config_schema_is_the_settings_schema_and_fits_every_example(workdir: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    result = run_cli("config-schema", cwd=workdir)
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == Settings.model_json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    examples = sorted(EXAMPLES.glob("*.yaml"))
    assert len(examples) >= 5
    for example in examples:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(example.read_text()))]
        assert errors == [], example
    broken = copy.deepcopy(base_config("http://127.0.0.1:9"))
    broken["projects"]["app"]["mode"] = "requird"
    broken["listn"] = "127.0.0.1:8080"
    errors = [e.message for e in validator.iter_errors(broken)]
    assert len(errors) == 2, errors
    assert any("'listn' was unexpected" in e for e in errors), errors
    assert any("'requird' is not one of" in e for e in errors), errors


# --- keygen: every key type --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kind", "size", "algorithms"),
    [
        pytest.param(
            (), rsa.RSAPrivateKey, 2048, "RS256, RS384, RS512, PS256, PS384, PS512", id="rsa"
        ),
        pytest.param(
            ("--bits", "3072"),
            rsa.RSAPrivateKey,
            3072,
            "RS256, RS384, RS512, PS256, PS384, PS512",
            id="rsa_3072",
        ),
        pytest.param(("--type", "ec"), ec.EllipticCurvePrivateKey, 256, "ES256", id="ec"),
        pytest.param(
            ("--type", "ec", "--curve", "P-384"),
            ec.EllipticCurvePrivateKey,
            384,
            "ES384",
            id="ec_p384",
        ),
        pytest.param(
            ("--type", "ec", "--curve", "P-521"),
            ec.EllipticCurvePrivateKey,
            521,
            "ES512",
            id="ec_p521",
        ),
        pytest.param(("--type", "ed25519"), ed25519.Ed25519PrivateKey, None, "EdDSA", id="ed25519"),
    ],
)
def test_keygen_writes_each_key_type(
    workdir: Path, options: tuple[str, ...], kind: type, size: int | None, algorithms: str
) -> None:
    result = run_cli("keygen", *options, "--out-dir", str(workdir), "--name", "k", cwd=workdir)
    assert result.returncode == 0, result.stderr
    private_path, public_path = workdir / "k.private.pem", workdir / "k.public.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    private = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    assert isinstance(private, kind)
    if isinstance(private, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        assert private.key_size == size
    public_pem = public_path.read_bytes()
    assert b"PRIVATE" not in public_pem
    assert serialization.load_pem_public_key(public_pem) == private.public_key()
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fingerprint = base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert f"fingerprint: SHA256:{fingerprint}" in result.stdout
    assert f"algorithms:  {algorithms}\n" in result.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(
            ("--type", "ec", "--bits", "4096"),
            "--bits applies to --type rsa only",
            id="bits_for_ec",
        ),
        pytest.param(("--curve", "P-384"), "--curve applies to --type ec only", id="curve_for_rsa"),
        pytest.param(
            ("--type", "ed25519", "--curve", "P-256"),
            "--curve applies to --type ec only",
            id="curve_for_ed25519",
        ),
    ],
)
def test_keygen_refuses_options_of_another_key_type(
    workdir: Path, options: tuple[str, ...], message: str
) -> None:
    result = run_cli("keygen", *options, "--out-dir", str(workdir), cwd=workdir)
    assert result.returncode == 2
    assert result.stderr == f"gateway keygen: {message}\n"
    assert list(workdir.glob("*.pem")) == []


# --- token mint: every algorithm the gateway verifies ------------------------------------------

HMAC_SECRET = "base64:" + base64.b64encode(bytes(range(64))).decode()
FAMILIES = {  # project: (keygen options, algorithms)
    "rsa": (("--type", "rsa"), ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]),
    "p256": (("--type", "ec", "--curve", "P-256"), ["ES256"]),
    "p384": (("--type", "ec", "--curve", "P-384"), ["ES384"]),
    "p521": (("--type", "ec", "--curve", "P-521"), ["ES512"]),
    "ed": (("--type", "ed25519"), ["EdDSA"]),
    "hmac": ((), ["HS256", "HS384", "HS512"]),
}


def test_token_mint_signs_every_algorithm_the_gateway_verifies(
    tmp_path: Path, workdir: Path
) -> None:
    secret_file = workdir / "secret.txt"
    secret_file.write_text(HMAC_SECRET + "\n")
    for project, (options, _) in FAMILIES.items():
        if options:
            made = run_cli(
                "keygen",
                *options,
                "--out-dir",
                str(tmp_path / "keys"),
                "--name",
                project,
                cwd=workdir,
            )
            assert made.returncode == 0, made.stderr

    def families(config: dict[str, Any]) -> None:
        config["projects"] = {
            project: {
                "mode": "required",
                "algorithms": algorithms,
                "keys": [
                    {"id": project, "secret": HMAC_SECRET}
                    if project == "hmac"
                    else {"id": project, "pem_file": f"keys/{project}.public.pem"}
                ],
            }
            for project, (_, algorithms) in FAMILIES.items()
        }

    identified = {"customer_ids": {"registered": "alice"}}
    with serving(tmp_path, workdir, families, {}) as served:
        for project, (_, algorithms) in FAMILIES.items():
            key = (
                ("--secret-file", str(secret_file))
                if project == "hmac"
                else ("--private-key", str(tmp_path / "keys" / f"{project}.private.pem"))
            )
            # Without --alg, the first algorithm the key fits.
            for alg in [None, *algorithms]:
                chosen = () if alg is None else ("--alg", alg)
                minted = run_cli(
                    "token", "mint", *key, *chosen, "--user", "alice", "--kid", project, cwd=workdir
                )
                assert minted.returncode == 0, (project, alg, minted.stderr)
                token = minted.stdout.strip()
                assert jwt.get_unverified_header(token)["alg"] == (alg or algorithms[0])
                headers = {"X-Sdk-Auth-Token": token}
                path = f"/track/v2/projects/{project}/customers/events"
                status, body = request(served.public_port, "POST", path, identified, headers)
                assert status == 200, (project, alg, body)
                forwarded = served.last_forwarded_headers()
                assert forwarded["x-auth-status"] == "verified", (project, alg)
                assert forwarded["x-authenticated-user"] == "alice"
        assert stop_with_sigterm(served) == 0


def test_token_mint_with_a_secret_verifies_through_token_inspect(
    tmp_path: Path, workdir: Path, key_a: KeyPair
) -> None:
    config = base_config("http://127.0.0.1:9")
    config["projects"]["app"]["algorithms"] = ["HS384"]
    config["projects"]["app"]["keys"] = [{"id": "hmac", "secret": HMAC_SECRET}]
    path = write_config(tmp_path, config, {})
    inspect = ("token", "inspect", "-c", str(path), "--project", "app", "--user", "alice")
    for given in (("--secret", HMAC_SECRET), ("--secret-file", str(tmp_path / "secret"))):
        (tmp_path / "secret").write_text(HMAC_SECRET + "\r\n")
        minted = run_cli(
            "token",
            "mint",
            *given,
            "--alg",
            "HS384",
            "--user",
            "alice",
            "--kid",
            "hmac",
            cwd=workdir,
        )
        assert minted.returncode == 0, minted.stderr
        judged = run_cli(*inspect, minted.stdout.strip(), cwd=workdir)
        assert judged.returncode == 0, judged.stdout + judged.stderr
        assert 'verdict: VERIFIED user="alice" key=hmac' in judged.stdout
    # The raw text of a secret is a different key from its base64 reading.
    minted = run_cli(
        "token",
        "mint",
        "--secret",
        HMAC_SECRET.removeprefix("base64:"),
        "--alg",
        "HS384",
        "--user",
        "alice",
        "--kid",
        "hmac",
        cwd=workdir,
    )
    assert minted.returncode == 0, minted.stderr
    judged = run_cli(*inspect, minted.stdout.strip(), cwd=workdir)
    assert "verdict: TOKEN_REJECTED (reason: signature_invalid)" in judged.stdout


def write_pem(directory: Path, name: str, key: Any) -> str:
    path = directory / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


@pytest.mark.parametrize(
    ("key", "alg", "message"),
    [
        pytest.param(
            "rsa",
            "ES256",
            "--alg ES256 needs an EC key; {rsa} holds an RSA key",
            id="rsa_for_es256",
        ),
        pytest.param(
            "ed",
            "PS256",
            "--alg PS256 needs an RSA key; {ed} holds an Ed25519 or Ed448 key",
            id="ed25519_for_ps256",
        ),
        pytest.param(
            "p256",
            "EdDSA",
            "--alg EdDSA needs an Ed25519 or Ed448 key; {p256} holds an EC key",
            id="ec_for_eddsa",
        ),
        pytest.param(
            "p256",
            "ES384",
            "--alg ES384: curve secp256r1 does not fit; it needs secp384r1",
            id="p256_for_es384",
        ),
        pytest.param(
            "rsa",
            "HS256",
            "--alg HS256 signs with --secret or --secret-file, not a private key",
            id="rsa_for_hs256",
        ),
        pytest.param(
            "secret",
            "RS256",
            "--alg RS256 signs with --private-key, not a secret",
            id="secret_for_rs256",
        ),
        pytest.param(
            "short",
            None,
            "--alg HS256: HMAC secret is 16 bytes; HS256 needs at least 32",
            id="short_secret",
        ),
        pytest.param(
            "secret",
            "HS512",
            "--alg HS512: HMAC secret is 48 bytes; HS512 needs at least 64",
            id="secret_short_for_hs512",
        ),
        pytest.param("not_pem", None, "{not_pem}: not a PEM private key", id="not_a_pem"),
        pytest.param("missing", None, "{missing}: No such file or directory", id="missing_file"),
    ],
)
def test_token_mint_refuses_a_key_that_does_not_fit_the_algorithm(
    workdir: Path, key_a: KeyPair, key: str, alg: str | None, message: str
) -> None:
    (workdir / "not.pem").write_text("not a key\n")
    files = {
        "rsa": str(write_private_key(workdir, key_a)),
        "ed": write_pem(workdir, "ed.pem", ed25519.Ed25519PrivateKey.generate()),
        "p256": write_pem(workdir, "p256.pem", ec.generate_private_key(ec.SECP256R1())),
        "not_pem": str(workdir / "not.pem"),
        "missing": str(workdir / "missing.pem"),
    }
    given = {
        "secret": ("--secret", "s" * 48),
        "short": ("--secret", "s" * 16),
    }.get(key) or ("--private-key", files[key])
    chosen = () if alg is None else ("--alg", alg)
    result = run_cli("token", "mint", *given, *chosen, "--user", "alice", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr == f"gateway token mint: {message.format(**files)}\n"
    assert result.stdout == ""


def test_token_mint_takes_exactly_one_key(workdir: Path, key_a: KeyPair) -> None:
    key_file = str(write_private_key(workdir, key_a))
    both = run_cli(
        "token", "mint", "--private-key", key_file, "--secret", "s" * 32, "--user", "a", cwd=workdir
    )
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
    neither = run_cli("token", "mint", "--user", "a", cwd=workdir)
    assert neither.returncode == 2
    assert "one of the arguments --private-key --secret --secret-file is required" in neither.stderr


def test_help_and_token_mint_load_neither_the_config_schema_nor_the_server(tmp_path: Path) -> None:
    """Each command imports what it uses when it runs: `--help` and `token mint` stay quick."""
    script = (
        "import contextlib, io, sys\n"
        "from gateway.tools.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "main(['keygen', '--out-dir', sys.argv[1], '--name', 'k'])\n"
        "main(['token', 'mint', '--private-key', sys.argv[1] + '/k.private.pem', '--user', 'u'])\n"
        "heavy = ('gateway.config', 'gateway.runtime', 'gateway.pipeline', 'pydantic', 'aiohttp')\n"
        "print([m for m in sys.modules if m.startswith(heavy)])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
