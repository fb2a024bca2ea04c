"""Projects as the config compiles them: keys checked and loaded, verifier policy, API keys.

Every problem is appended with its YAML path; nothing is refused here, so one run lists them all.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Final, Literal

from gateway.auth.algorithms import KeyType
from gateway.auth.jwks import JwksUrl, ProjectKeys
from gateway.auth.keys import (
    KeyProblem,
    VerificationKey,
    parse_jwks,
    parse_public_pem,
    parse_secret,
    verification_key,
)
from gateway.auth.subject import IdMapSubject, ScalarSubject, Subject
from gateway.auth.verify import Policy, TokenCache, TokenVerifier
from gateway.base.clock import Clock
from gateway.config.settings import LoadedConfig, Problem, ProjectSettings

OTHER_PROJECTS: Final = "_other"
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


def compile_project(
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
    subject = _subject(settings)
    project_keys = ProjectKeys(
        static=keys,
        policy=_policy(settings, subject),
        identity=_verifier_identity(project_id, settings),
        cache=cache,
        clock=clock,
        jwks=_jwks_url(settings),
    )
    return Project(
        id=project_id,
        label=label,
        mode=settings.mode,
        subject=subject,
        keys=project_keys,
        api_key_digests=tuple(filter(None, map(_api_key_digest, settings.api_keys))),
        expiry_warning_seconds=settings.expiry_warning_seconds,
    )


def _jwks_url(settings: ProjectSettings) -> JwksUrl | None:
    if not settings.jwks_url:
        return None
    return JwksUrl(
        settings.jwks_url, settings.jwks_refresh_seconds, settings.jwks_min_refetch_seconds
    )


def _subject(settings: ProjectSettings) -> Subject:
    subject = settings.subject
    if subject.format == "id_map":
        return IdMapSubject(subject.claim, frozenset(subject.anonymous_ids))
    return ScalarSubject(subject.claim, subject.key if subject.format == "key_value" else None)


def _policy(settings: ProjectSettings, subject: Subject) -> Policy:
    return Policy(
        algorithms=frozenset(settings.algorithms),
        subject=subject.read_token,
        audience=settings.audience,
        issuer=settings.issuer,
        leeway=settings.leeway_seconds,
        max_lifetime=settings.max_token_lifetime_seconds,
        require_typ=settings.require_typ,
    )


def _verifier_identity(project_id: str, settings: ProjectSettings) -> bytes:
    """What a verified token's cache entry depends on: a reload that changes none of it keeps
    the project's verified tokens."""
    return repr(
        (
            project_id,
            settings.model_dump(
                exclude={"mode", "api_keys", "keys", "expiry_warning_seconds", "jwks_url"}
            ),
        )
    ).encode()


_SHA256_ENTRY: Final = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _api_key_digest(entry: str) -> bytes | None:
    """The digest an API key entry stands for; None for one `_check_api_keys` refuses."""
    if _SHA256_ENTRY.fullmatch(entry):
        return bytes.fromhex(entry.removeprefix("sha256:"))
    if not entry or entry.startswith("sha256:"):
        return None
    return hashlib.sha256(entry.encode()).digest()


def check_api_keys(settings: ProjectSettings, path: str, problems: list[Problem]) -> None:
    for index, entry in enumerate(settings.api_keys):
        if not entry:
            problems.append(Problem(f"{path}.api_keys[{index}]", "an API key is empty"))
        elif entry.startswith("sha256:") and not _SHA256_ENTRY.fullmatch(entry):
            problems.append(
                Problem(f"{path}.api_keys[{index}]", "sha256: needs 64 hexadecimal digits")
            )
