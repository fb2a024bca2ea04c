"""Routes as the config compiles them: templates, project sources, identity/token/session
sources, and the checks that tie routes to the projects they can reach.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from gateway.auth.extract import (
    HeaderSource,
    JsonSource,
    QuerySource,
    Source,
    parse_json_path,
)
from gateway.config.cors import CorsPolicy
from gateway.config.router import RouteEntry, TemplateError, compile_template, placeholder_pattern
from gateway.config.settings import (
    Problem,
    ProjectSettings,
    RouteSettings,
    Settings,
    SourceSettings,
)
from gateway.http.messages import normalise_header_name
from gateway.refusals.answers import ErrorFormat


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

API_KEY_SOURCE: Final = HeaderSource("authorization", "token")
DEFAULT_UPSTREAM: Final = "default"  # the name of `upstream` in metrics and logs


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
    upstream: str  # a name from `upstreams`, or DEFAULT_UPSTREAM
    reads_json: bool = field(init=False)
    json_paths: tuple[tuple[str | None, ...], ...] = field(init=False)  # steps of json sources
    reads_query: bool = field(init=False)
    watched_headers: frozenset[str] = field(init=False)
    # What `forward_token: false` strips: whole headers, scheme-matched values, query parameters.
    token_header_drop: frozenset[str] = field(init=False)
    # name → b"scheme " prefixes, longest last; derived from `token`, so left out of equality
    # and hashing
    token_scheme_drop: dict[str, tuple[bytes, ...]] = field(init=False, compare=False, hash=False)
    token_query_drop: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        sources = (*self.identity, *self.token, *self.session)
        set_ = object.__setattr__
        set_(self, "reads_json", any(isinstance(s, JsonSource) for s in sources))
        paths = dict.fromkeys(s.steps for s in sources if isinstance(s, JsonSource))
        set_(self, "json_paths", tuple(paths))
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
        schemes: dict[str, tuple[bytes, ...]] = {}
        for source in headers:
            if source.scheme is not None:
                prefixes = (*schemes.get(source.name, ()), f"{source.scheme} ".encode())
                schemes[source.name] = tuple(sorted(prefixes, key=len))
        set_(self, "token_scheme_drop", schemes)
        set_(
            self,
            "token_query_drop",
            frozenset(s.name for s in stripped if isinstance(s, QuerySource)),
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


def compile_route(
    route_settings: RouteSettings, settings: Settings, index: int, problems: list[Problem]
) -> RouteEntry[Route] | None:
    path = f"routes[{index}]"
    try:
        pattern = compile_template(route_settings.path)
    except TemplateError as exc:
        problems.append(Problem(f"{path}.path", f"{exc} (got {route_settings.path!r})"))
        return None
    project_from = _project_from(route_settings, pattern)
    if project_from is None:
        problems.append(
            Problem(path, "no project: add {project} to the path, or a project: {header|id} block")
        )
        return None
    sources = partial(_compile_sources, route_settings, settings, path=path, problems=problems)
    route = Route(
        name=route_settings.name,
        methods=frozenset(route_settings.methods),
        project_from=project_from,
        api_key="api_key" in route_settings.auth,
        sdk_jwt="sdk_jwt" in route_settings.auth,
        identity=sources("identity"),
        token=tuple(s for s in sources("token") if isinstance(s, HeaderSource | QuerySource)),
        session=sources("session"),
        forward_token=route_settings.forward_token,
        error_format=ErrorFormat(route_settings.error_format),
        cors=None,
        upstream=route_settings.upstream or DEFAULT_UPSTREAM,
    )
    if route_settings.cors is not None:
        cors = CorsPolicy.build(
            route_settings.cors.origins,
            route.methods,
            route.watched_headers,
            route_settings.cors.max_age_seconds,
        )
        route = dataclasses.replace(route, cors=cors)
    _check_sources(route, path, problems)
    return RouteEntry(pattern, route.methods, route)


def _project_from(route_settings: RouteSettings, pattern: re.Pattern[str]) -> ProjectFrom | None:
    """Where the route reads its project: a header, a fixed id, or `{project}` in its path."""
    if route_settings.project is not None:
        if route_settings.project.header is not None:
            return ProjectFromHeader(normalise_header_name(route_settings.project.header))
        assert route_settings.project.id is not None
        return ProjectFixed(route_settings.project.id)
    if "project" not in pattern.groupindex:
        return None
    restriction = placeholder_pattern(route_settings.path, "project")
    literal = restriction is not None and re.fullmatch(
        r"[A-Za-z0-9._~-]+(\|[A-Za-z0-9._~-]+)*", restriction
    )
    return ProjectFromPath(
        only=frozenset(restriction.lower().split("|")) if literal and restriction else None
    )


def _check_sources(route: Route, path: str, problems: list[Problem]) -> None:
    """Each role has its sources, no header serves two."""
    if route.sdk_jwt and not route.identity:
        problems.append(Problem(f"{path}.identity", "sdk_jwt needs at least one identity source"))
    if route.sdk_jwt and not route.token:
        problems.append(Problem(f"{path}.token", "sdk_jwt needs at least one token source"))
    _check_header_roles(route, path, problems)


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


def check_route_projects(
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
