"""What the config compiles to, once: the route table, the projects, and what a request reads.

`projects.py` and `routes.py` compile the parts; this module checks what spans them and
assembles the result. Every problem is collected with its YAML path before anything is refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from gateway.auth.verify import TokenCache
from gateway.base.clock import Clock
from gateway.config.projects import OTHER_PROJECTS, Project, check_api_keys, compile_project
from gateway.config.router import RouteEntry, Router
from gateway.config.routes import (
    DEFAULT_UPSTREAM,
    Route,
    check_route_projects,
    compile_route,
)
from gateway.config.settings import ConfigError, LoadedConfig, Problem, Settings, load_settings
from gateway.config.tls import listener_context, upstream_context


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
    listener_tls: ssl.SSLContext | None  # HTTPS on the public listener, when `tls` is set
    upstream_tls: dict[str, ssl.SSLContext | None]  # by upstream name: for https:// ones

    def project(self, project_id: str) -> Project:
        return self.projects.get(project_id.lower(), self.other_projects)


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
    every_project = [("defaults", settings.defaults)] + [
        (f"projects.{project_id}", project) for project_id, project in settings.projects.items()
    ]
    warnings.extend(
        Problem(
            f"{path}.jwks_refresh_seconds",
            f"{project.jwks_refresh_seconds} s: every replica fetches the JWKS this often; "
            "identity providers may rate-limit below 10 s",
        )
        for path, project in every_project
        if project.jwks_url is not None and project.jwks_refresh_seconds < 10
    )
    return warnings + _shared_key_warnings(settings, projects)


def _shared_key_warnings(settings: Settings, projects: dict[str, Project]) -> list[Problem]:
    """Projects that share a key accept each other's tokens unless audience or issuer tell
    them apart."""
    owners: dict[bytes, list[str]] = {}
    shown: dict[bytes, str] = {}
    for project_id, project in projects.items():
        for key in project.keys.static:
            users = owners.setdefault(key.material, [])
            if project_id not in users:
                users.append(project_id)
            shown[key.material] = f"{key.kid} ({key.fingerprint})"
    warnings = []
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


def _compile_projects(
    loaded: LoadedConfig, clock: Clock, cache: TokenCache, problems: list[Problem]
) -> tuple[dict[str, Project], Project]:
    """The listed projects, by their ids as written, and the one for every other id."""
    settings = loaded.settings
    folded = Counter(p.lower() for p in settings.projects)
    problems.extend(
        Problem(f"projects.{project_id}", "another project id differs only by case")
        for project_id in settings.projects
        if folded[project_id.lower()] > 1
    )
    compile_one = partial(compile_project, loaded=loaded, cache=cache, clock=clock)
    projects: dict[str, Project] = {}
    for project_id, project_settings in settings.projects.items():
        path = f"projects.{project_id}"
        check_api_keys(project_settings, path, problems)
        projects[project_id] = compile_one(
            project_id=project_id,
            label=project_id,
            settings=project_settings,
            path=path,
            problems=problems,
        )
    check_api_keys(settings.defaults, "defaults", problems)
    other = compile_one(
        project_id=OTHER_PROJECTS,
        label=OTHER_PROJECTS,
        settings=settings.defaults,
        path="defaults",
        problems=problems,
    )
    return projects, other


def _compile_routes(settings: Settings, problems: list[Problem]) -> list[RouteEntry[Route]]:
    names = Counter(r.name for r in settings.routes)
    entries = []
    for index, route_settings in enumerate(settings.routes):
        if names[route_settings.name] > 1:
            problems.append(
                Problem(f"routes[{index}].name", f"{route_settings.name!r} names two routes")
            )
        name = route_settings.upstream
        if name is not None and name not in settings.upstreams:
            known = ", ".join(sorted(settings.upstreams)) or "none"
            problems.append(
                Problem(f"routes[{index}].upstream", f"{name!r} is not in upstreams ({known})")
            )
        entry = compile_route(route_settings, settings, index, problems)
        if entry is not None:
            check_route_projects(entry.route, index, settings, problems)
            entries.append(entry)
    return entries


def _upstream_contexts(
    loaded: LoadedConfig, problems: list[Problem]
) -> dict[str, ssl.SSLContext | None]:
    settings = loaded.settings
    if DEFAULT_UPSTREAM in settings.upstreams:
        problems.append(
            Problem(f"upstreams.{DEFAULT_UPSTREAM}", "is the name of `upstream`: choose another")
        )
    contexts = {DEFAULT_UPSTREAM: upstream_context(loaded, settings.upstream, "upstream", problems)}
    for name, upstream in settings.upstreams.items():
        contexts[name] = upstream_context(loaded, upstream, f"upstreams.{name}", problems)
    return contexts


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
    projects, other = _compile_projects(loaded, clock, cache, problems)
    entries = _compile_routes(settings, problems)
    tls = listener_context(loaded, settings.tls, problems) if settings.tls else None
    upstream_tls = _upstream_contexts(loaded, problems)
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
        listener_tls=tls,
        upstream_tls=upstream_tls,
    )


def load_and_compile(
    path: Path, clock: Clock, cache: TokenCache | None = None, env: Mapping[str, str] | None = None
) -> CompiledConfig:
    """Read, validate and compile a config file; `ConfigError` lists every problem at once:
    when the schema refuses some keys, the checks after it still run on the rest, and report
    what they find outside the refused keys (a weak key is not hidden by a typo elsewhere)."""
    try:
        loaded = load_settings(path, env)
    except ConfigError as refused:
        if refused.salvaged is None:
            raise
        found = {p.path for p in refused.problems}
        try:
            compile_config(refused.salvaged, clock, cache)
        except ConfigError as more:
            refused.problems.extend(
                p
                for p in more.problems
                if not any(p.path == f or p.path.startswith((f + ".", f + "[")) for f in found)
            )
        raise ConfigError(refused.problems) from None
    return compile_config(loaded, clock, cache)
