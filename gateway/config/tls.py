"""TLS contexts compiled from the config: the listener's (when `tls` is set) and each https://
upstream's. Every file is read and checked here, so a missing file, a certificate that does not
parse or a key that does not match it is a config problem with its YAML path, never a failure
on the first connection."""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.config.settings import LoadedConfig, Problem, TlsSettings, UpstreamSettings


def _file(loaded: LoadedConfig, name: str, where: str, problems: list[Problem]) -> Path | None:
    path = (loaded.base_dir / name).resolve()
    if not path.is_file():
        problems.append(Problem(where, f"{name}: no such file"))
        return None
    return path


def _load_pair(
    context: ssl.SSLContext, cert: Path, key: Path, where: str, problems: list[Problem]
) -> bool:
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        # The library's reason (e.g. KEY_VALUES_MISMATCH, PEM_lib), never the files' bytes.
        problems.append(Problem(where, f"{cert.name} / {key.name}: {exc.__class__.__name__} {exc}"))
        return False
    return True


def listener_context(
    loaded: LoadedConfig, settings: TlsSettings, problems: list[Problem]
) -> ssl.SSLContext | None:
    """HTTPS on the public listener: TLS 1.2 or later, ALPN http/1.1 only."""
    cert = _file(loaded, settings.cert_file, "tls.cert_file", problems)
    key = _file(loaded, settings.key_file, "tls.key_file", problems)
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if not _load_pair(context, cert, key, "tls", problems):
        return None
    return context


def upstream_context(
    loaded: LoadedConfig, settings: UpstreamSettings, path: str, problems: list[Problem]
) -> ssl.SSLContext | None:
    """For an https:// upstream: verification always on (the system's CAs or `ca_file`),
    TLS 1.2 or later, a client certificate for mutual TLS. None for http://."""
    if not settings.url.startswith("https://"):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if settings.ca_file is not None:
        ca = _file(loaded, settings.ca_file, f"{path}.ca_file", problems)
        if ca is None:
            return None
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            problems.append(Problem(f"{path}.ca_file", f"{settings.ca_file}: {exc}"))
            return None
    if settings.client_cert_file is not None and settings.client_key_file is not None:
        cert = _file(loaded, settings.client_cert_file, f"{path}.client_cert_file", problems)
        key = _file(loaded, settings.client_key_file, f"{path}.client_key_file", problems)
        if cert is None or key is None or not _load_pair(context, cert, key, path, problems):
            return None
    return context
