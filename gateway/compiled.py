"""What the config compiles to, once: the route table, key sets, verifiers and hashed API keys.

Also the checks that need more than one field (SPEC §3 "Validation at load"). Every problem is
collected with its YAML path before anything is refused, so one run lists them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.algorithms import KeyType
from gateway.clock import Clock
from gateway.config import (
    ConfigError,
    LoadedConfig,
    Problem,
    ProjectSettings,
    RouteSettings,
    Settings,
    SourceSettings,
)
from gateway.cors import CorsPolicy
from gateway.errors import ErrorFormat
from gateway.extract import (
    HeaderSource,
    JsonSource,
    QuerySource,
    Source,
    normalise_header_name,
    parse_json_path,
)
from gateway.jwks import JwksUrl, ProjectKeys
from gateway.keys import (
    KeyProblem,
    VerificationKey,
    parse_jwks,
    parse_public_pem,
    parse_secret,
    verification_key,
)
from gateway.routes import (
    RouteEntry,
    Router,
    TemplateError,
    compile_template,
    placeholder_pattern,
)
from gateway.subject import IdMapSubject, ScalarSubject, Subject
from gateway.verify import Policy, TokenCache, TokenVerifier

OTHER_PROJECTS = "_other"
Mode = Literal["disabled", "monitor", "required"]


@dataclass(frozen=True, slots=True)
class Project:
    id: str  # as configured (the canonical spelling); for unlisted projects, `_other`
    label: str  # the metrics label: the id, or `_other`
    mode: Mode
    subject: Subject
    keys: ProjectKeys
    api_key_digests: tuple[bytes, ...]
    expiry_warning_seconds: int

    @property
    def verifier(self) -> TokenVerifier | None:
        """The verifier for the keys as they stand now (a JWKS refresh replaces it)."""
        return self.keys.verifier

    def api_key_matches(self, presented: str) -> bool:
        digest = hashlib.sha256(presented.encode()).digest()
        # Compare against every key so the time taken does not tell which one nearly matched.
        matched = False
        for expected in self.api_key_digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched and bool(presented)


@dataclass(frozen=True, slots=True)
class ProjectFromPath:
    group: str = "project"
    # `{project:a|b}`: the route serves only these projects (and never the defaults).
    only: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ProjectFromHeader:
    name: str  # normalised


@dataclass(frozen=True, slots=True)
class ProjectFixed:
    id: str


ProjectFrom = ProjectFromPath | ProjectFromHeader | ProjectFixed

API_KEY_SOURCE = HeaderSource("authorization", "token")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    methods: frozenset[str]
    project_from: ProjectFrom
    api_key: bool
    sdk_jwt: bool
    identity: tuple[Source, ...]
    token: tuple[HeaderSource | QuerySource, ...]
    session: tuple[Source, ...]
    forward_token: bool
    error_format: ErrorFormat
    cors: CorsPolicy | None
    reads_json: bool = field(init=False)
    reads_query: bool = field(init=False)
    watched_headers: frozenset[str] = field(init=False)
    # What `forward_token: false` strips: whole headers, scheme-matched values, query parameters.
    token_header_drop: frozenset[str] = field(init=False)
    token_scheme_drop: frozenset[tuple[str, str]] = field(init=False)
    token_query_drop: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        sources = (*self.identity, *self.token, *self.session)
        set_ = object.__setattr__
        set_(self, "reads_json", any(isinstance(s, JsonSource) for s in sources))
        set_(self, "reads_query", any(isinstance(s, QuerySource) for s in sources))
        watched = {s.name for s in sources if isinstance(s, HeaderSource)}
        if self.api_key:
            watched.add(API_KEY_SOURCE.name)
        if isinstance(self.project_from, ProjectFromHeader):
            watched.add(self.project_from.name)
        set_(self, "watched_headers", frozenset(watched))
        stripped = () if self.forward_token else self.token
        headers = [s for s in stripped if isinstance(s, HeaderSource)]
        set_(self, "token_header_drop", frozenset(s.name for s in headers if s.scheme is None))
        set_(
            self,
            "token_scheme_drop",
            frozenset((s.name, s.scheme) for s in headers if s.scheme is not None),
        )
        set_(
            self,
            "token_query_drop",
            frozenset(s.name for s in stripped if isinstance(s, QuerySource)),
        )


@dataclass(frozen=True, slots=True)
class CompiledConfig:
    settings: Settings
    source: Path
    router: Router[Route]
    projects: dict[str, Project]  # by lower-cased id
    other_projects: Project
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    warnings: tuple[Problem, ...]
    digest: str
    key_fingerprints: dict[str, tuple[tuple[str, str], ...]]  # project → ((kid, fingerprint),)
    token_cache: TokenCache

    def project(self, project_id: str) -> Project:
        return self.projects.get(project_id.lower(), self.other_projects)


# --- keys and projects -------------------------------------------------------------------------


def _read_pem(loaded: LoadedConfig, pem: str | None, pem_file: str | None) -> str:
    if pem is not None:
        return pem
    assert pem_file is not None
    try:
        return (loaded.base_dir / pem_file).resolve().read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyProblem(f"{pem_file}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL in the path
        raise KeyProblem(f"{pem_file}: cannot read ({exc})") from None


def _compile_keys(
    loaded: LoadedConfig, settings: ProjectSettings, path: str, problems: list[Problem]
) -> tuple[VerificationKey, ...]:
    keys: list[VerificationKey] = []
    seen: dict[str, int] = {}
    allowed = frozenset(settings.algorithms)
    for index, key_settings in enumerate(settings.keys):
        key_path = f"{path}.keys[{index}]"
        if key_settings.id in seen:
            problems.append(
                Problem(
                    f"{key_path}.id",
                    f"{key_settings.id!r} is already the id of keys[{seen[key_settings.id]}]",
                )
            )
            continue
        seen[key_settings.id] = index
        if key_settings.secret is not None:
            field_name = "secret"
        else:
            field_name = "pem" if key_settings.pem is not None else "pem_file"
        key: object
        try:
            if key_settings.secret is not None:
                key, key_type = parse_secret(key_settings.secret), KeyType.HMAC
            else:
                text = _read_pem(loaded, key_settings.pem, key_settings.pem_file)
                key, key_type = parse_public_pem(text)
            keys.append(verification_key(key_settings.id, key, key_type, allowed))
        except KeyProblem as exc:
            problems.append(Problem(f"{key_path}.{field_name}", str(exc)))
    if settings.jwks_file is not None:
        keys.extend(_jwks_file_keys(loaded, settings, path, seen, allowed, problems))
    return tuple(keys)


def _jwks_file_keys(
    loaded: LoadedConfig,
    settings: ProjectSettings,
    path: str,
    seen: dict[str, int],
    allowed: frozenset[str],
    problems: list[Problem],
) -> list[VerificationKey]:
    assert settings.jwks_file is not None
    where = f"{path}.jwks_file"
    try:
        data = (loaded.base_dir / settings.jwks_file).read_bytes()
    except FileNotFoundError:
        problems.append(Problem(where, f"{settings.jwks_file}: no such file"))
        return []
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        problems.append(Problem(where, f"{settings.jwks_file!r}: cannot read ({reason})"))
        return []
    try:
        keys = parse_jwks(data, allowed, allow_secrets=True)
    except KeyProblem as exc:
        problems.append(Problem(where, f"{settings.jwks_file}: {exc}"))
        return []
    problems.extend(
        Problem(where, f"kid {k.kid!r} is already the id of keys[{seen[k.kid]}]")
        for k in keys
        if k.kid in seen
    )
    return [k for k in keys if k.kid not in seen]


def _compile_project(
    *,
    loaded: LoadedConfig,
    project_id: str,
    label: str,
    settings: ProjectSettings,
    path: str,
    cache: TokenCache,
    clock: Clock,
    problems: list[Problem],
) -> Project:
    keys = _compile_keys(loaded, settings, path, problems)
    if settings.mode != "disabled" and not (
        settings.keys or settings.jwks_file or settings.jwks_url
    ):
        problems.append(
            Problem(
                f"{path}.keys",
                f"mode {settings.mode} needs at least one key source (keys, jwks_file, jwks_url)",
            )
        )
    subject_settings = settings.subject
    subject: Subject
    if subject_settings.format == "id_map":
        subject = IdMapSubject(subject_settings.claim, frozenset(subject_settings.anonymous_ids))
    else:
        key = subject_settings.key if subject_settings.format == "key_value" else None
        subject = ScalarSubject(subject_settings.claim, key)
    policy = Policy(
        algorithms=frozenset(settings.algorithms),
        subject=subject.read_token,
        audience=settings.audience,
        issuer=settings.issuer,
        leeway=settings.leeway_seconds,
        max_lifetime=settings.max_token_lifetime_seconds,
    )
    identity = repr(
        (
            project_id,
            settings.model_dump(
                exclude={"mode", "api_keys", "keys", "expiry_warning_seconds", "jwks_url"}
            ),
        )
    ).encode()
    jwks = (
        JwksUrl(settings.jwks_url, settings.jwks_refresh_seconds, settings.jwks_min_refetch_seconds)
        if settings.jwks_url
        else None
    )
    project_keys = ProjectKeys(
        static=keys, policy=policy, identity=identity, cache=cache, clock=clock, jwks=jwks
    )
    return Project(
        id=project_id,
        label=label,
        mode=settings.mode,
        subject=subject,
        keys=project_keys,
        api_key_digests=tuple(
            d for d in (_api_key_digest(k) for k in settings.api_keys) if d is not None
        ),
        expiry_warning_seconds=settings.expiry_warning_seconds,
    )


_SHA256_ENTRY = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _api_key_digest(entry: str) -> bytes | None:
    """The digest an API key entry stands for; None for one `_check_api_keys` refuses."""
    if _SHA256_ENTRY.fullmatch(entry):
        return bytes.fromhex(entry.removeprefix("sha256:"))
    if not entry or entry.startswith("sha256:"):
        return None
    return hashlib.sha256(entry.encode()).digest()


def _check_api_keys(settings: ProjectSettings, path: str, problems: list[Problem]) -> None:
    for index, entry in enumerate(settings.api_keys):
        if not entry:
            problems.append(Problem(f"{path}.api_keys[{index}]", "an API key is empty"))
        elif entry.startswith("sha256:") and not _SHA256_ENTRY.fullmatch(entry):
            problems.append(
                Problem(f"{path}.api_keys[{index}]", "sha256: needs 64 hexadecimal digits")
            )


# --- routes ------------------------------------------------------------------------------------


def _compile_source(
    settings: SourceSettings, role: str, path: str, problems: list[Problem]
) -> Source | None:
    if settings.id is not None and role != "identity":
        problems.append(Problem(f"{path}.id", "id applies to identity sources only"))
    if settings.header is not None:
        scheme = settings.scheme.lower() if settings.scheme else None
        return HeaderSource(normalise_header_name(settings.header), scheme, settings.id)
    if settings.query is not None:
        return QuerySource(settings.query, settings.id)
    assert settings.json_path is not None
    if role == "token":
        problems.append(Problem(path, "a token is read from a header or query, not json"))
        return None
    try:
        steps = parse_json_path(settings.json_path)
        return JsonSource(settings.json_path, steps, settings.id)
    except ValueError as exc:
        problems.append(Problem(f"{path}.json", f"{exc} (got {settings.json_path!r})"))
        return None


def _compile_sources(
    route: RouteSettings, settings: Settings, role: str, path: str, problems: list[Problem]
) -> tuple[Source, ...]:
    own: tuple[SourceSettings, ...] | None = getattr(route, role)
    chosen = own if own is not None else getattr(settings, role)
    base = f"{path}.{role}" if own is not None else role
    compiled = (_compile_source(s, role, f"{base}[{i}]", problems) for i, s in enumerate(chosen))
    return tuple(s for s in compiled if s is not None)


def _check_header_roles(route: Route, path: str, problems: list[Problem]) -> None:
    roles: dict[tuple[str, str | None], list[str]] = {}
    for role, sources in (
        ("identity", route.identity),
        ("token", route.token),
        ("session", route.session),
    ):
        for source in sources:
            if isinstance(source, HeaderSource):
                roles.setdefault((source.name, source.scheme), []).append(role)
    if route.api_key:
        roles.setdefault((API_KEY_SOURCE.name, API_KEY_SOURCE.scheme), []).append("api_key")
    if isinstance(route.project_from, ProjectFromHeader):
        roles.setdefault((route.project_from.name, None), []).append("project")
    for (name, scheme), used_by in roles.items():
        distinct = sorted(set(used_by))
        if len(distinct) > 1:
            shown = name + (f" ({scheme})" if scheme else "")
            problems.append(
                Problem(path, f"header {shown} serves two roles: {', '.join(distinct)}")
            )
    unscoped = {name for (name, scheme) in roles if scheme is None}
    for name, scheme in roles:
        if scheme is not None and name in unscoped:
            problems.append(Problem(path, f"header {name} is read both with and without a scheme"))


def _compile_route(
    route_settings: RouteSettings, settings: Settings, index: int, problems: list[Problem]
) -> RouteEntry[Route] | None:
    path = f"routes[{index}]"
    try:
        pattern = compile_template(route_settings.path)
    except TemplateError as exc:
        problems.append(Problem(f"{path}.path", f"{exc} (got {route_settings.path!r})"))
        return None
    project_from: ProjectFrom
    if route_settings.project is not None:
        if route_settings.project.header is not None:
            project_from = ProjectFromHeader(normalise_header_name(route_settings.project.header))
        else:
            assert route_settings.project.id is not None
            project_from = ProjectFixed(route_settings.project.id)
    elif "project" in pattern.groupindex:
        restriction = placeholder_pattern(route_settings.path, "project")
        literal = restriction is not None and re.fullmatch(
            r"[A-Za-z0-9._~-]+(\|[A-Za-z0-9._~-]+)*", restriction
        )
        project_from = ProjectFromPath(
            only=frozenset(restriction.lower().split("|")) if literal and restriction else None
        )
    else:
        problems.append(
            Problem(path, "no project: add {project} to the path, or a project: {header|id} block")
        )
        return None
    token_sources = tuple(
        s
        for s in _compile_sources(route_settings, settings, "token", path, problems)
        if isinstance(s, HeaderSource | QuerySource)
    )
    route = Route(
        name=route_settings.name,
        methods=frozenset(route_settings.methods),
        project_from=project_from,
        api_key="api_key" in route_settings.auth,
        sdk_jwt="sdk_jwt" in route_settings.auth,
        identity=_compile_sources(route_settings, settings, "identity", path, problems),
        token=token_sources,
        session=_compile_sources(route_settings, settings, "session", path, problems),
        forward_token=route_settings.forward_token,
        error_format=ErrorFormat(route_settings.error_format),
        cors=None,
    )
    if route_settings.cors is not None:
        cors = CorsPolicy.build(
            route_settings.cors.origins,
            route.methods,
            route.watched_headers,
            route_settings.cors.max_age_seconds,
        )
        route = dataclasses.replace(route, cors=cors)
    if route.sdk_jwt and not route.identity:
        problems.append(Problem(f"{path}.identity", "sdk_jwt needs at least one identity source"))
    if route.sdk_jwt and not route.token:
        problems.append(Problem(f"{path}.token", "sdk_jwt needs at least one token source"))
    _check_header_roles(route, path, problems)
    return RouteEntry(pattern, route.methods, route)


def _check_identity_fits(
    route: Route, index: int, where: str, project: ProjectSettings, problems: list[Problem]
) -> None:
    """An id_map subject needs every header/query identity source to name its id type; the
    other formats compare one user id, so no source may name one."""
    id_map = project.subject.format == "id_map"
    for source in route.identity:
        if id_map and source.id is None and not isinstance(source, JsonSource):
            problems.append(
                Problem(
                    f"routes[{index}].identity",
                    f"{source} reaches {where} (subject id_map) but names no id: add id: <type>",
                )
            )
        elif not id_map and source.id is not None:
            problems.append(
                Problem(
                    f"routes[{index}].identity",
                    f"{source} names id {source.id!r} but {where} compares one user id "
                    f"(subject {project.subject.format})",
                )
            )


def _reachable_projects(route: Route, settings: Settings) -> list[tuple[str, ProjectSettings]]:
    source = route.project_from
    if isinstance(source, ProjectFixed):
        wanted = source.id.lower()
        listed = [(k, v) for k, v in settings.projects.items() if k.lower() == wanted]
        return listed or [("defaults", settings.defaults)]
    if isinstance(source, ProjectFromPath) and source.only is not None:
        listed = [(k, v) for k, v in settings.projects.items() if k.lower() in source.only]
        if len(listed) < len(source.only):
            listed.append(("defaults", settings.defaults))
        return listed
    return [("defaults", settings.defaults), *settings.projects.items()]


def _check_route_projects(
    route: Route, index: int, settings: Settings, problems: list[Problem]
) -> None:
    for name, project in _reachable_projects(route, settings):
        where = "defaults" if name == "defaults" else f"projects.{name}"
        if route.sdk_jwt and project.mode != "disabled":
            _check_identity_fits(route, index, where, project, problems)
        if route.api_key and not project.api_keys:
            problems.append(
                Problem(
                    f"routes[{index}].auth",
                    f"api_key reaches {where}, which has no api_keys",
                )
            )


# --- the whole config --------------------------------------------------------------------------


def _warnings(settings: Settings, projects: dict[str, Project]) -> list[Problem]:
    warnings = []
    if settings.failure_counter.backend == "memory" and settings.workers != 1:
        warnings.append(
            Problem(
                "failure_counter.backend",
                "memory with more than one worker: each worker counts its sessions alone",
            )
        )
    owners: dict[bytes, list[str]] = {}
    shown: dict[bytes, str] = {}
    for project_id, project in projects.items():
        for key in project.keys.static:
            users = owners.setdefault(key.material, [])
            if project_id not in users:
                users.append(project_id)
            shown[key.material] = f"{key.kid} ({key.fingerprint})"
    for material, users in owners.items():
        unscoped = [
            p for p in users if (s := settings.projects[p]).audience is None and s.issuer is None
        ]
        if len(users) > 1 and unscoped:
            warnings.append(
                Problem(
                    "projects",
                    f"projects {', '.join(sorted(users))} share key {shown[material]} and "
                    f"{', '.join(sorted(unscoped))} set no audience or issuer: "
                    "each accepts the other's tokens",
                )
            )
    return warnings


def compile_config(
    loaded: LoadedConfig, clock: Clock, cache: TokenCache | None = None
) -> CompiledConfig:
    """Check and compile everything, or raise `ConfigError` with every problem found."""
    settings = loaded.settings
    problems: list[Problem] = []
    # A running gateway passes its cache in, so a reload keeps the tokens of unchanged
    # verifiers (the cache is keyed by verifier generation; changed ones start afresh).
    if cache is None or cache.max_entries != settings.verified_token_cache.max_entries:
        cache = TokenCache(settings.verified_token_cache.max_entries)

    folded = Counter(p.lower() for p in settings.projects)
    problems.extend(
        Problem(f"projects.{project_id}", "another project id differs only by case")
        for project_id in settings.projects
        if folded[project_id.lower()] > 1
    )

    projects: dict[str, Project] = {}
    for project_id, project_settings in settings.projects.items():
        path = f"projects.{project_id}"
        _check_api_keys(project_settings, path, problems)
        projects[project_id] = _compile_project(
            loaded=loaded,
            project_id=project_id,
            label=project_id,
            settings=project_settings,
            path=path,
            cache=cache,
            clock=clock,
            problems=problems,
        )
    _check_api_keys(settings.defaults, "defaults", problems)
    other = _compile_project(
        loaded=loaded,
        project_id=OTHER_PROJECTS,
        label=OTHER_PROJECTS,
        settings=settings.defaults,
        path="defaults",
        cache=cache,
        clock=clock,
        problems=problems,
    )

    names = Counter(r.name for r in settings.routes)
    entries = []
    for index, route_settings in enumerate(settings.routes):
        if names[route_settings.name] > 1:
            problems.append(
                Problem(f"routes[{index}].name", f"{route_settings.name!r} names two routes")
            )
        entry = _compile_route(route_settings, settings, index, problems)
        if entry is not None:
            _check_route_projects(entry.route, index, settings, problems)
            entries.append(entry)

    if problems:
        raise ConfigError(problems)
    return CompiledConfig(
        settings=settings,
        source=loaded.source,
        router=Router(entries),
        projects={k.lower(): v for k, v in projects.items()},
        other_projects=other,
        trusted_proxies=tuple(
            ipaddress.ip_network(c, strict=False) for c in settings.trusted_proxies
        ),
        warnings=tuple(_warnings(settings, projects)),
        digest=hashlib.sha256(settings.model_dump_json().encode()).hexdigest(),
        key_fingerprints={
            p: tuple((k.kid, k.fingerprint) for k in proj.keys.static)
            for p, proj in projects.items()
        },
        token_cache=cache,
    )
