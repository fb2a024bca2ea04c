"""The running config as an operator may see it (`GET /-/config`): every secret, API key, PEM
and credential replaced by its fingerprint, so two gateways can be compared without either
showing what it holds."""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.config.settings import SECRET_FIELDS, Settings


def fingerprint(value: str) -> str:
    """The first 16 hex digits of the value's SHA-256: enough to tell two values apart, and
    nothing of the value itself."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:16]


def redacted(settings: Settings) -> dict[str, Any]:
    view = _redact(settings.model_dump(mode="json"), None)
    assert isinstance(view, dict)
    return view


def _redact(value: Any, key: str | None) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if not isinstance(value, str) or key not in SECRET_FIELDS:
        return value
    if key == "api_keys" and value.startswith("sha256:"):
        return value  # already a digest: what the config holds in place of the key
    if key == "redis_url":
        return _without_password(value)
    return fingerprint(value)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{fingerprint(parts.password)}@{host}"))
