"""Consecutive authentication failures per session (SPEC §4): one interface, several backends.

A backend that cannot answer returns None: the request is then decided as if the count were zero,
because the counter only ever turns a 401 into a 429 and failing closed would protect nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.hashing import sha256


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session as the counter stores it: the project's label plus a digest, never a user id."""

    namespace: str
    digest: bytes


def session_key(label: str, project_id: str, kind: str, value: str) -> SessionKey:
    material = "\x00".join((project_id, kind, value)).encode("utf-8", "surrogatepass")
    return SessionKey(label, sha256(material))


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

    @property
    def empty(self) -> bool:
        """True when no session can have a failure counted: a reset would change nothing."""
        ...

    async def close(self) -> None: ...
