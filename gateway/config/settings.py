"""YAML → typed, validated, frozen settings (docs/configuration.md).

Three passes, each reporting every problem it finds with its YAML path: the YAML itself (with
duplicate keys refused), `${NAME}` substitution in string values, then the typed schema. What
needs more than one field to judge (keys, routes against projects) is checked by `compiled.py`.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A config that must not serve; carries every problem found, each with its YAML path.

    `salvaged`: when the schema refused some keys, the config without them, if that passes the
    schema; the checks after the schema run on it, so an unknown key does not hide a weak key
    elsewhere."""

    def __init__(self, problems: list[Problem], salvaged: LoadedConfig | None = None) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
        self.salvaged = salvaged


def yaml_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# --- YAML --------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), exc.strerror or str(exc))]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(str(path), "not UTF-8 text")]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(str(path), _yaml_error(exc))]) from None


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line: where the YAML broke and why (PyYAML's own text spans several)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    return "invalid YAML: " + " ".join(str(exc).split())


# --- ${NAME} substitution ----------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")


def substitute_env(
    node: Any, env: Mapping[str, str], problems: list[Problem], loc: tuple[int | str, ...] = ()
) -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in string values; `$$` is a literal `$`.

    Runs on parsed YAML, so a variable's value is always a scalar and never adds structure.
    """
    if isinstance(node, dict):
        return {k: substitute_env(v, env, problems, (*loc, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, problems, (*loc, i)) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name, default = match.group(2), match.group(3)
        value = env.get(name)
        if default is not None and not value:
            return default  # `:-` as in the shell: unset or empty
        if value is not None:
            return value
        problems.append(Problem(yaml_path(loc), f"environment variable {name} is not set"))
        return ""

    return _VARIABLE.sub(replace, node)


# --- schema ------------------------------------------------------------------------------------


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listen_address(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError("HOST must be an IP address or localhost") from None
    return value


ListenAddress = Annotated[str, BeforeValidator(_listen_address)]


def _endpoint(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(
        r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", value
    ):
        raise ValueError("expected HOST:PORT")
    return value


Endpoint = Annotated[str, BeforeValidator(_endpoint)]
PositiveSeconds = Annotated[float, Field(gt=0)]


class UpstreamSettings(_Settings):
    url: str = "http://127.0.0.1:8000"
    connect_timeout_seconds: PositiveSeconds = 2.0
    timeout_seconds: PositiveSeconds = 30.0
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 256
    # A pooled connection idle this long is closed: below the upstream's own keep-alive timeout
    # (5 s in Node and many frameworks), so no request is sent on a connection it is closing.
    idle_timeout_seconds: PositiveSeconds = 4.0
    # HOST:PORT addresses to connect to, round-robin, instead of the URL's; `Host` and the TLS
    # name stay the URL's. One that refuses a connection is skipped for a while.
    endpoints: tuple[Endpoint, ...] = ()
    # https: only. Verification is always on: the system's CAs, or these.
    ca_file: str | None = None
    server_name: str | None = None  # the name sent (SNI) and verified, if not the URL's host
    client_cert_file: str | None = None  # mutual TLS: this certificate ...
    client_key_file: str | None = None  # ... with this key

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?(/[A-Za-z0-9._~\-/]*)?", value):
            raise ValueError("expected http(s)://HOST[:PORT][/PREFIX] with no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls_keys_fit(self) -> UpstreamSettings:
        tls_keys = ("ca_file", "server_name", "client_cert_file", "client_key_file")
        if not self.url.startswith("https://"):
            for key in tls_keys:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} is for an https:// url")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        return self


class TlsSettings(_Settings):
    """The public listener speaks HTTPS: TLS 1.2 or later, ALPN http/1.1."""

    cert_file: str  # PEM certificate chain, the server's first; read again on every reload
    key_file: str


class LimitsSettings(_Settings):
    max_body_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    # Reading a body for identity costs about 15 ms per MiB of the worst JSON (tiny objects) in
    # orjson, which holds the GIL, whichever thread runs it: 1 MiB keeps the wait it can impose
    # on every other request well under 50 ms.
    max_decompressed_bytes: Annotated[int, Field(ge=1)] = 1_048_576
    max_token_bytes: Annotated[int, Field(ge=256, le=65_536)] = 8192
    body_timeout_seconds: PositiveSeconds = 30.0
    # A connection without a complete request head for this long is closed: idle keep-alive
    # and slow headers (slowloris) alike. Keep it above any load balancer's idle timeout.
    idle_timeout_seconds: PositiveSeconds = 75.0
    # Past this many open client connections (per process) a new one is closed at once: what
    # clients hold (bodies, answers they read slowly) stays bounded. Keep it under `ulimit -n`.
    max_client_connections: Annotated[int, Field(ge=1)] = 10_000


class ShutdownSettings(_Settings):
    drain_delay_seconds: Annotated[float, Field(ge=0)] = 0.0
    grace_seconds: Annotated[float, Field(ge=0)] = 20.0


class FailureCounterSettings(_Settings):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    redis_timeout_ms: Annotated[int, Field(ge=1, le=10_000)] = 50
    threshold: Annotated[int, Field(ge=1)] = 10
    session_ttl_seconds: Annotated[int, Field(ge=1)] = 1800
    max_sessions: Annotated[int, Field(ge=1)] = 100_000


class VerifiedTokenCacheSettings(_Settings):
    max_entries: Annotated[int, Field(ge=0)] = 500_000


class AccessLogSettings(_Settings):
    enabled: bool = True


class TracingSettings(_Settings):
    """OpenTelemetry spans, exported over OTLP/HTTP in batches off the request path."""

    otlp_endpoint: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]  # e.g. .../v1/traces
    service_name: Annotated[str, Field(min_length=1)] = "ingestion-gateway"
    # For requests that arrive without a sampled `traceparent`; one that has one is traced.
    sample_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01


class SubjectSettings(_Settings):
    claim: Annotated[str, Field(min_length=1)] = "sub"
    format: Literal["key_value", "string", "id_map"] = "key_value"
    key: Annotated[str, Field(min_length=1)] = "uid"  # key_value only
    anonymous_ids: tuple[str, ...] = ()  # id_map only: ids that never need a token

    @model_validator(mode="after")
    def _fits_format(self) -> SubjectSettings:
        if self.anonymous_ids and self.format != "id_map":
            raise ValueError("anonymous_ids applies to format id_map only")
        return self


class KeySettings(_Settings):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    description: str = ""
    pem: str | None = None
    pem_file: str | None = None
    secret: str | None = None  # HMAC (HS*): raw UTF-8, or base64:...

    @model_validator(mode="after")
    def _one_source(self) -> KeySettings:
        if sum(v is not None for v in (self.pem, self.pem_file, self.secret)) != 1:
            raise ValueError("give exactly one of pem, pem_file, secret")
        return self


Mode = Literal["disabled", "monitor", "required"]
Algorithm = Literal[
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
    "HS256",
    "HS384",
    "HS512",
]


class ProjectSettings(_Settings):
    mode: Mode = "disabled"
    algorithms: Annotated[tuple[Algorithm, ...], Field(min_length=1)] = ("RS256", "RS512")
    subject: SubjectSettings = SubjectSettings()
    audience: str | None = None
    issuer: str | None = None
    leeway_seconds: Annotated[int, Field(ge=0, le=300)] = 30
    # MoEngage requires `typ: JWT`; libraries such as `jose` omit it. Another `typ` is always
    # refused: it names a token meant for something else.
    require_typ: bool = True
    max_token_lifetime_seconds: Annotated[int, Field(ge=0)] = 0
    expiry_warning_seconds: Annotated[int, Field(ge=0)] = 300
    api_keys: tuple[str, ...] = ()
    keys: tuple[KeySettings, ...] = ()
    jwks_file: Annotated[str | None, Field(min_length=1)] = None
    jwks_url: str | None = None
    jwks_refresh_seconds: Annotated[int, Field(ge=1, le=86_400)] = 300
    jwks_min_refetch_seconds: Annotated[int, Field(ge=1, le=3600)] = 10

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = re.fullmatch(r"(https?)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+)(:\d+)?(/\S*)?", value)
        if match is None:
            raise ValueError("expected https://HOST[:PORT]/PATH")
        scheme, host = match.group(1), match.group(2).strip("[]")
        if scheme == "http" and host != "localhost":
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError("must be https:// (http:// only to a loopback address)")
        return value


class SourceSettings(_Settings):
    json_path: Annotated[str | None, Field(alias="json")] = None
    header: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")] = None
    query: Annotated[str | None, Field(min_length=1)] = None
    scheme: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")] = None
    id: Annotated[str | None, Field(min_length=1)] = None  # id_map subjects: the id carried

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_place(self) -> SourceSettings:
        given = [n for n in ("json_path", "header", "query") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, header, query")
        if self.scheme is not None and self.header is None:
            raise ValueError("scheme applies to header sources only")
        return self


class ProjectFromSettings(_Settings):
    header: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")] = None
    id: Annotated[str | None, Field(min_length=1)] = None

    @model_validator(mode="after")
    def _one_place(self) -> ProjectFromSettings:
        if (self.header is None) == (self.id is None):
            raise ValueError("give exactly one of header, id")
        return self


class CorsSettings(_Settings):
    origins: Annotated[tuple[str, ...], Field(min_length=1)]
    max_age_seconds: Annotated[int, Field(ge=0, le=86_400)] = 600

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d+)?", origin):
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return value


AuthMethod = Literal["none", "api_key", "sdk_jwt"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class RouteSettings(_Settings):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    methods: Annotated[tuple[HttpMethod, ...], Field(min_length=1)]
    path: Annotated[str, Field(min_length=1)]
    auth: Annotated[tuple[AuthMethod, ...], Field(min_length=1)]
    project: ProjectFromSettings | None = None
    identity: tuple[SourceSettings, ...] | None = None
    token: tuple[SourceSettings, ...] | None = None
    session: tuple[SourceSettings, ...] | None = None
    forward_token: bool = False
    upstream: str | None = None  # a name from `upstreams`; None: `upstream`
    error_format: Literal["standard", "bloomreach"] = "standard"
    cors: CorsSettings | None = None

    @field_validator("methods", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v.upper() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("auth")
    @classmethod
    def _none_alone(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "none" in value and len(value) > 1:
            raise ValueError("none cannot be combined with other auth methods")
        if len(set(value)) != len(value):
            raise ValueError("an auth method is listed twice")
        return value


def _workers(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 256:
        raise ValueError("expected a number of processes from 1 to 256, or auto")
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("not a CIDR (expected e.g. 10.0.0.0/8)") from None
    return value


class Settings(_Settings):
    listen: ListenAddress = "0.0.0.0:8080"
    admin_listen: ListenAddress = "127.0.0.1:9090"
    # When set, POST /-/reload and GET /-/config on the admin listener need
    # `Authorization: Bearer <admin_token>`; probes and /metrics stay open.
    admin_token: Annotated[str, Field(min_length=16)] | None = None
    workers: Annotated[int | Literal["auto"], BeforeValidator(_workers)] = 1
    trusted_proxies: tuple[Annotated[str, AfterValidator(_cidr)], ...] = ()
    tls: TlsSettings | None = None
    upstream: UpstreamSettings = UpstreamSettings()
    # Further upstreams by name, for routes that name one.
    upstreams: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], UpstreamSettings] = {}
    limits: LimitsSettings = LimitsSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    failure_counter: FailureCounterSettings = FailureCounterSettings()
    verified_token_cache: VerifiedTokenCacheSettings = VerifiedTokenCacheSettings()
    access_log: AccessLogSettings = AccessLogSettings()
    tracing: TracingSettings | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # the operational log
    defaults: ProjectSettings = ProjectSettings()
    projects: dict[str, ProjectSettings] = {}
    identity: tuple[SourceSettings, ...] = ()
    token: tuple[SourceSettings, ...] = ()
    session: tuple[SourceSettings, ...] = ()
    routes: Annotated[tuple[RouteSettings, ...], Field(min_length=1)]


# --- loading -----------------------------------------------------------------------------------

# Values at these places may be credentials; problems about them never echo the value.
SECRET_FIELDS = ("pem", "secret", "api_keys", "redis_url", "admin_token")

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


_CREDENTIALS_IN_URL = re.compile(r"(://)[^/@\s]*@")


def _location(error: Mapping[str, Any]) -> tuple[int | str, ...]:
    # Drop pydantic's own steps (`function-after[...]`, union branches): they are not YAML.
    return tuple(
        p
        for p in error["loc"]
        if not (isinstance(p, str) and (p.startswith("function-") or "[" in p))
    )


def _describe(error: Mapping[str, Any]) -> Problem:
    loc = _location(error)
    path = yaml_path(loc)
    message = _MESSAGES.get(error["type"], str(error["msg"]))
    message = message.removeprefix("Value error, ")
    quiet = error["type"] in ("missing", "extra_forbidden")  # an unknown key may be a secret
    if quiet or any(str(p) in SECRET_FIELDS for p in loc):
        return Problem(path, message)
    bad = error.get("input")
    if isinstance(bad, dict | list | tuple):
        return Problem(path, message)
    shown = _CREDENTIALS_IN_URL.sub(r"\1***@", repr(bad))
    return Problem(path, f"{message} (got {shown})")


def _problems(errors: list[Any], known: set[str]) -> list[Problem]:
    """Pydantic errors as problems, minus echoes: a list whose only item failed is not also
    "too short", and a value whose variable was unset is reported once, as unset."""
    described = [_describe(e) for e in errors]
    failed_items = {p.path.rsplit("[", 1)[0] for p in described if p.path.endswith("]")}
    return [
        p
        for p, e in zip(described, errors, strict=True)
        if p.path not in known
        and not (e["type"] == "too_short" and p.path in failed_items)
        and not (p.path.rsplit("[", 1)[0] in failed_items and e["type"] == "too_short")
    ]


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    settings: Settings
    source: Path
    base_dir: Path


def parse_settings(raw: Any, source: Path, env: Mapping[str, str]) -> LoadedConfig:
    problems: list[Problem] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem("", "the config must be a YAML mapping")])
    substituted = substitute_env(raw, env, problems)
    try:
        settings = Settings.model_validate(substituted)
    except ValidationError as exc:
        unset = {p.path for p in problems}
        errors = exc.errors(include_url=False)
        problems.extend(_problems(errors, unset))
        salvaged = _without(substituted, [_location(e) for e in errors])
        raise ConfigError(
            problems, None if salvaged is None else LoadedConfig(salvaged, source, source.parent)
        ) from None
    if problems:
        raise ConfigError(problems, LoadedConfig(settings, source, source.parent))
    return LoadedConfig(settings, source, source.parent)


def _without(raw: dict[str, Any], locations: list[tuple[int | str, ...]]) -> Settings | None:
    """The settings without the keys the schema refused (their defaults in their place), or
    None when that does not pass the schema either (a required key was the one refused)."""
    pruned = copy.deepcopy(raw)
    for loc in locations:
        node: Any = pruned
        for step in loc[:-1]:
            node = node[step] if _has(node, step) else None
        if isinstance(node, dict) and loc and loc[-1] in node:
            del node[loc[-1]]
    try:
        return Settings.model_validate(pruned)
    except ValidationError:
        return None


def _has(node: Any, step: int | str) -> bool:
    if isinstance(node, dict):
        return step in node
    return isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    return parse_settings(read_yaml(path), path.resolve(), os.environ if env is None else env)
