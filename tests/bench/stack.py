"""Starting what is measured: nginx (upstream and bare baseline), HAProxy, Redis, gateways.

Each `start_*` returns a ready `Target` (or a `Skipped` with the reason), after a smoke
request proved it answers the benchmark's requests with 2xx and, where it enforces tokens,
refuses a token for another user with 401.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.bench import configs
from tests.bench.dataset import PATH, FreshPool, ZipfCursor
from tests.bench.procs import (
    BenchError,
    Service,
    Supervisor,
    accepts_tcp,
    answers_http,
    answers_redis_ping,
    command_output,
    find_binary,
    http_request,
    wait_until,
)
from tests.bench.wrkrun import Requests

HAPROXY_MINIMUM = (2, 5)  # jwt_verify, jwt_payload_query, http_auth_bearer


@dataclass(frozen=True, slots=True)
class Tools:
    wrk: str
    nginx: str
    haproxy: str | None
    redis: str | None
    gateway: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BenchTls:
    """A self-signed certificate for 127.0.0.1: the proxies under test serve it, the smoke
    checks trust it (wrk does not verify)."""

    cert: Path
    key: Path
    combined: Path  # certificate and key in one file, as HAProxy's `crt` takes them
    client: ssl.SSLContext

    @classmethod
    def generate(cls, directory: Path) -> BenchTls:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert, private, combined = (directory / n for n in ("tls.crt", "tls.key", "tls.pem"))
        cert.write_bytes(cert_pem)
        private.write_bytes(key_pem)
        combined.write_bytes(cert_pem + key_pem)
        client = ssl.create_default_context(cafile=cert)
        return cls(cert, private, combined, client)


@dataclass(frozen=True, slots=True)
class Smoke:
    """A request the target must accept, and (where it enforces tokens) tokens it must refuse
    with 401 on the same body: (what is wrong with it, token)."""

    token: str
    body: str
    refused: tuple[tuple[str, str], ...] = ()


@dataclass
class Target:
    key: str
    label: str
    port: int
    service: Service
    requests: Requests  # what the measured runs send (fresh: replaced per run from `fresh`)
    warmup: Requests
    fresh: FreshPool | ZipfCursor | None = None  # requests drawn per run from a pool
    cores: int = 1  # the cores it may use (workers: N on several)
    shares_load_core: bool = False  # one of them is also wrk's and the upstream's
    scheme: str = "http"
    admin_port: int | None = None  # a gateway's: its cache counters are read around each run

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{PATH}"

    def cpu_pids(self) -> list[int]:
        return self.service.cpu_pids()


@dataclass(frozen=True, slots=True)
class Skipped:
    key: str
    label: str
    reason: str


def find_tools() -> Tools:
    """wrk and nginx are required; HAProxy and Redis only skip their targets when missing."""
    wrk, nginx = find_binary("wrk"), find_binary("nginx")
    missing = [name for name, path in (("wrk", wrk), ("nginx", nginx)) if path is None]
    if missing or wrk is None or nginx is None:
        raise BenchError(
            f"required binaries not found: {', '.join(missing)} "
            "(Debian: apt-get install -y wrk nginx-light)"
        )
    return Tools(wrk, nginx, find_binary("haproxy"), find_binary("redis-server"), gateway_cli())


def gateway_cli() -> tuple[str, ...]:
    """BENCH_GATEWAY (a command, e.g. another interpreter's `python -m gateway`, to compare
    builds), else the `gateway` script of this interpreter's environment, else `-m gateway`."""
    override = os.environ.get("BENCH_GATEWAY", "").strip()
    if override:
        return tuple(shlex.split(override))
    script = Path(sys.executable).parent / "gateway"
    return (str(script),) if script.exists() else (sys.executable, "-m", "gateway")


def haproxy_version(haproxy: str) -> tuple[int, int] | None:
    found = re.search(r"version (\d+)\.(\d+)", command_output([haproxy, "-v"]))
    return (int(found[1]), int(found[2])) if found else None


# --- smoke checks ------------------------------------------------------------------------------


def post_event(
    port: int, token: str, body: str, tls: ssl.SSLContext | None = None
) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    answer = http_request(port, "POST", PATH, headers, body.encode(), tls=tls)
    return answer.status, answer.body[:300].decode(errors="replace")


def smoke_problem(port: int, smoke: Smoke, tls: ssl.SSLContext | None = None) -> str | None:
    """Why the target is not fit to measure, or None."""
    status, text = post_event(port, smoke.token, smoke.body, tls)
    if not 200 <= status < 300:
        return f"a valid request was answered {status}: {text}"
    for what, token in smoke.refused:
        status, text = post_event(port, token, smoke.body, tls)
        if status != 401:
            return f"a token with {what} was answered {status}, not 401: {text}"
    return None


def require_smoke(label: str, port: int, smoke: Smoke, tls: ssl.SSLContext | None = None) -> None:
    problem = smoke_problem(port, smoke, tls)
    if problem is not None:
        raise BenchError(f"{label}: smoke check failed: {problem}")


# --- the services ------------------------------------------------------------------------------


def start_nginx(
    sup: Supervisor, nginx: str, name: str, port: int, prefix: Sequence[str]
) -> Service:
    home = sup.workdir / name
    home.mkdir()
    conf = home / "nginx.conf"
    conf.write_text(configs.nginx_conf(port, home))
    service = sup.start(name, [*prefix, nginx, "-e", "stderr", "-p", str(home), "-c", str(conf)])
    wait_until(service, f"nginx answering on port {port}", answers_http(port, "/"))
    return service


def start_redis(sup: Supervisor, redis: str, port: int, prefix: Sequence[str]) -> Service:
    argv = [
        *prefix,
        redis,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(sup.workdir),
    ]
    service = sup.start("redis", argv)
    wait_until(service, f"redis answering PING on port {port}", answers_redis_ping(port))
    return service


def start_haproxy(
    sup: Supervisor,
    haproxy: str | None,
    port: int,
    upstream_port: int,
    public_key: Path,
    prefix: Sequence[str],
    smoke: Smoke,
    tls: BenchTls | None = None,
) -> Service | str:
    """The running HAProxy, or why its target is skipped."""
    if haproxy is None:
        return "haproxy not found (Debian: apt-get install -y haproxy)"
    version = haproxy_version(haproxy)
    if version is None or version < HAPROXY_MINIMUM:
        wanted = ".".join(map(str, HAPROXY_MINIMUM))
        return f"haproxy {version} is too old: jwt_verify needs {wanted} or later"
    cfg = sup.workdir / f"haproxy-{port}.cfg"
    pem = tls.combined if tls is not None else None
    cfg.write_text(configs.haproxy_cfg(port, upstream_port, public_key, pem))
    check = subprocess.run(
        [haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )
    if check.returncode != 0:
        return f"haproxy rejects the generated config: {(check.stdout + check.stderr).strip()}"
    service = sup.start(f"haproxy-{port}", [*prefix, haproxy, "-db", "-f", str(cfg)])
    wait_until(service, f"haproxy accepting on port {port}", accepts_tcp(port))
    problem = smoke_problem(port, smoke, tls.client if tls is not None else None)
    return service if problem is None else f"haproxy smoke check failed: {problem}"


def check_gateway_config(gateway: Sequence[str], path: Path) -> None:
    done = subprocess.run(
        [*gateway, "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(
            f"gateway check-config refused {path}:\n{(done.stdout + done.stderr).strip()}"
        )


def start_gateway(
    sup: Supervisor,
    gateway: Sequence[str],
    name: str,
    settings: Callable[[int, int], dict[str, object]],
    ports: tuple[int, int],
    prefix: Sequence[str],
) -> Service:
    """Write and check the config (`settings(port, admin_port)`), start, wait for /readyz."""
    port, admin_port = ports
    path = configs.write_yaml(sup.workdir / f"{name}.yaml", settings(port, admin_port))
    check_gateway_config(gateway, path)
    # stdout is the access log: measured (it is part of the work) but not kept.
    service = sup.start(name, [*prefix, *gateway, "run", "-c", str(path)], stdout_to_log=False)
    wait_until(service, "admin /readyz answering 200", answers_http(admin_port, "/readyz"))
    return service
