"""Consecutive authentication failures per session: one interface, several backends.

A backend that cannot answer returns None: the request is then decided as if the count were zero,
because the counter only ever turns a 401 into a 429 and failing closed would protect nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.base.hashing import sha256


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session as the counter stores it: the project's label plus a digest, never a user id."""

    namespace: str
    digest: bytes
    hint: int = field(compare=False)  # its `session_hint`, in this process only


Session = tuple[str, str, str, str]  # project label, project id, kind of session, its value


def session_hint(session: Session) -> int:
    """A cheap stand-in for a session's key, to ask `FailureCounter.may_hold` before paying a
    SHA-256 for a reset (Python's randomised hash: equal for equal sessions in this process,
    rarely equal for two others, and then only a digest is computed for nothing)."""
    return hash(session)


def session_key(label: str, project_id: str, kind: str, value: str) -> SessionKey:
    material = "\x00".join((project_id, kind, value)).encode("utf-8", "surrogatepass")
    return SessionKey(label, sha256(material), session_hint((label, project_id, kind, value)))


@dataclass(frozen=True, slots=True)
class FailureCount:
    count: int
    retry_after: int  # whole seconds until the session's window ends


class FailureCounter(Protocol):
    backend: str

    async def record_failure(self, key: SessionKey) -> FailureCount | None:
        """Count one failure; None when the backend could not count it in time."""
        ...

    def reset(self, key: SessionKey) -> None:
        """Clear a session after a success, off the request's path."""
        ...

    def may_hold(self, hint: int) -> bool:
        """False when no session with this `session_hint` can have a failure counted: its
        reset would change nothing, and its key need not be computed."""
        ...

    async def close(self) -> None: ...
