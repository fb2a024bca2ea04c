"""TLS on both sides, against real TLS peers whose CA and certificates the tests generate: the
listener terminating HTTPS (TLS 1.2+, ALPN http/1.1, certificates re-read on reload), and
https:// upstreams verified against the system's CAs or `ca_file`, with SNI, `server_name` and
mutual TLS. A TLS failure towards the upstream is a 502 and one log line."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.base.clock import ManualClock
from gateway.config.compiled import compile_config
from gateway.config.settings import ConfigError, load_settings
from gateway.tools.sample_upstream import make_sample_upstream
from tests.conftest import GatewayFactory, RunningGateway, Upstream, base_config

REQUEST = b"GET /v2/sdkconfig HTTP/1.1\r\nHost: gw\r\nX-App-Id: app\r\n\r\n"


@dataclass
class Issued:
    cert: Path
    key: Path


class Authority:
    """A test CA that issues certificates for localhost and 127.0.0.1 into a directory."""

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            self._builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-').lower()}.pem"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, name: str, *, client: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        certificate = (
            self._builder(subject, self.certificate.subject, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        issued = Issued(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


def client_context(authority: Authority, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=authority.path)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def https_get(port: int, context: ssl.SSLContext) -> tuple[int, bytes, ssl.SSLObject]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(REQUEST)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
        ssl_object = writer.get_extra_info("ssl_object")
        return int(head.split(b" ")[1]), body, ssl_object
    finally:
        writer.close()


async def tls_gateway(make_gateway: GatewayFactory, issued: Issued) -> RunningGateway:
    return await make_gateway(tls={"cert_file": str(issued.cert), "key_file": str(issued.key)})


# === the listener =================================================================================


async def test_the_listener_speaks_https_with_alpn_http_1_1(
    make_gateway: GatewayFactory, authority: Authority, upstream: Upstream
) -> None:
    gateway = await tls_gateway(make_gateway, authority.issue("gateway"))
    status, _, ssl_object = await https_get(
        gateway.port, client_context(authority, ["h2", "http/1.1"])
    )
    assert status == 200
    assert ssl_object.selected_alpn_protocol() == "http/1.1"
    assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
    assert upstream.last_headers()["x-forwarded-proto"] == "https"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_below_1_2_and_plain_http_are_refused_and_counted(
    make_gateway: GatewayFactory, authority: Authority
) -> None:
    gateway = await tls_gateway(make_gateway, authority.issue("gateway"))
    old = client_context(authority)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await https_get(gateway.port, old)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(REQUEST)
    async with asyncio.timeout(5):
        answer = await reader.read()  # closed: nothing HTTP comes back
    writer.close()
    assert not answer.startswith(b"HTTP/")
    metrics = gateway.server.metrics

    async def counted() -> bool:
        metrics.flush()
        refused: float = metrics.connections_refused.labels("tls_handshake")._value.get()
        return refused >= 2

    async with asyncio.timeout(5):
        while not await counted():  # noqa: ASYNC110 - the handshakes end on the server's side
            await asyncio.sleep(0.01)


async def test_certificates_are_read_again_on_reload(
    make_gateway: GatewayFactory, authority: Authority
) -> None:
    issued = authority.issue("gateway")
    gateway = await tls_gateway(make_gateway, issued)
    _, _, before = await https_get(gateway.port, client_context(authority))
    first = before.getpeercert(binary_form=True)
    authority.issue("gateway")  # a new certificate and key at the same paths
    result = await gateway.server.reload()
    assert result.ok, result.problems
    _, _, after = await https_get(gateway.port, client_context(authority))
    second = after.getpeercert(binary_form=True)
    assert first != second
    assert second == ssl.PEM_cert_to_DER_cert(issued.cert.read_text())


@pytest.mark.parametrize(
    ("tls", "where"),
    [
        pytest.param(
            {"cert_file": "missing.crt", "key_file": "gateway.key"}, "tls.cert_file", id="missing"
        ),
        pytest.param(
            {"cert_file": "gateway.crt", "key_file": "other.key"}, "tls", id="key_mismatch"
        ),
        pytest.param(
            {"cert_file": "gateway.key", "key_file": "gateway.key"}, "tls", id="not_a_cert"
        ),
    ],
)
def test_listener_tls_problems_name_their_place(
    tmp_path: Path, authority: Authority, tls: dict[str, str], where: str
) -> None:
    authority.issue("gateway")
    authority.issue("other")
    problems = config_problems(tmp_path, {"tls": tls})
    assert where in [p.path for p in problems], problems


def config_problems(tmp_path: Path, overrides: dict[str, Any]) -> list[Any]:
    config = base_config("http://127.0.0.1:1")
    config["projects"]["app"]["mode"] = "disabled"
    config["projects"]["app"].pop("keys")
    config.update(overrides)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        compile_config(load_settings(path, env={}), ManualClock(0))
    except ConfigError as refused:
        return list(refused.problems)
    return []


# === https upstreams ==============================================================================


HttpsUpstream = Callable[..., Awaitable[int]]


@pytest.fixture
async def https_upstream(authority: Authority) -> AsyncIterator[HttpsUpstream]:
    runners: list[web.AppRunner] = []

    async def start(*, require_client_cert: bool = False) -> int:
        issued = authority.issue("upstream")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(issued.cert, issued.key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=authority.path)
        runner = web.AppRunner(make_sample_upstream(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        runners.append(runner)
        port: int = runner.addresses[0][1]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


async def get_status(gateway: RunningGateway) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(REQUEST)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split(b" ")[1])
    finally:
        writer.close()


async def test_an_https_upstream_is_verified_against_ca_file(
    make_gateway: GatewayFactory, authority: Authority, https_upstream: HttpsUpstream
) -> None:
    port = await https_upstream()
    gateway = await make_gateway(
        upstream={"url": f"https://localhost:{port}", "ca_file": str(authority.path)}
    )
    assert (await get_status(gateway)) == 200


async def test_server_name_is_sent_and_verified_in_place_of_the_urls_host(
    make_gateway: GatewayFactory, authority: Authority, https_upstream: HttpsUpstream
) -> None:
    port = await https_upstream()
    gateway = await make_gateway(
        upstream={
            "url": f"https://127.0.0.1:{port}",  # an address: the certificate names localhost
            "ca_file": str(authority.path),
            "server_name": "localhost",
        }
    )
    assert (await get_status(gateway)) == 200
    wrong = await make_gateway(
        upstream={
            "url": f"https://localhost:{port}",
            "ca_file": str(authority.path),
            "server_name": "elsewhere.example",
        }
    )
    assert (await get_status(wrong)) == 502


async def test_an_upstream_certificate_nobody_trusts_is_a_502_and_one_log_line(
    make_gateway: GatewayFactory,
    https_upstream: HttpsUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = await https_upstream()
    gateway = await make_gateway(upstream={"url": f"https://localhost:{port}"})  # system CAs
    with caplog.at_level(logging.ERROR, logger="gateway.upstream"):
        assert (await get_status(gateway)) == 502
    (line,) = [r for r in caplog.records if r.getMessage() == "upstream TLS handshake failed"]
    fields = line.__dict__["fields"]
    assert fields["upstream"] == f"https://localhost:{port}"
    assert "CERTIFICATE_VERIFY_FAILED" in fields["error"]


async def test_mutual_tls_presents_the_client_certificate(
    make_gateway: GatewayFactory, authority: Authority, https_upstream: HttpsUpstream
) -> None:
    port = await https_upstream(require_client_cert=True)
    common = {"url": f"https://localhost:{port}", "ca_file": str(authority.path)}
    without = await make_gateway(upstream=common)
    assert (await get_status(without)) == 502
    client = authority.issue("gateway-client", client=True)
    with_cert = await make_gateway(
        upstream={
            **common,
            "client_cert_file": str(client.cert),
            "client_key_file": str(client.key),
        }
    )
    assert (await get_status(with_cert)) == 200


@pytest.mark.parametrize(
    ("upstream", "where"),
    [
        pytest.param(
            {"url": "https://localhost:1", "ca_file": "missing.pem"},
            "upstream.ca_file",
            id="missing_ca",
        ),
        pytest.param(
            {"url": "http://localhost:1", "ca_file": "ca.pem"}, "upstream", id="tls_key_on_http"
        ),
        pytest.param(
            {"url": "https://localhost:1", "client_cert_file": "c.crt"},
            "upstream",
            id="cert_without_key",
        ),
    ],
)
def test_upstream_tls_problems_name_their_place(
    tmp_path: Path, upstream: dict[str, str], where: str
) -> None:
    problems = config_problems(tmp_path, {"upstream": upstream})
    assert any(p.path == where or p.path.startswith(where + ".") for p in problems), problems
