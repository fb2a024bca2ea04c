"""Who the client is, the session a request counts against, and the counting: consecutive token
failures per session, reset by a verified request."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.auth.subject import identity_key
from gateway.base.clock import perf_counter
from gateway.config.projects import Project
from gateway.counters import FailureCounter, Session, session_key
from gateway.forwarding.headers import IPNetwork, client_address
from gateway.http.messages import Request
from gateway.stages.authenticate import Attempt
from gateway.telemetry.metrics import Timings


def session_of(project: Project, project_id: str, attempt: Attempt, client: str | None) -> Session:
    """The request's session id, else its user, else its client address."""
    folded_id = project_id.lower()
    if attempt.session_id is not None:
        return project.label, folded_id, "session", attempt.session_id
    if attempt.identity is not None:
        return project.label, folded_id, "user", identity_key(attempt.identity)
    return project.label, folded_id, "client", client or ""


async def count_failure(
    counter: FailureCounter, session: Session, threshold: int, timings: Timings
) -> int | None:
    """Counts a token failure; the `Retry-After` of the 429 once the session is past
    `threshold`, else None (a counter that cannot answer limits nobody)."""
    started = perf_counter()
    count = await counter.record_failure(session_key(*session))
    timings.observe(perf_counter() - started)
    if count is None or count.count <= threshold:
        return None
    return count.retry_after


def client_of(request: Request, trusted_proxies: Sequence[IPNetwork]) -> str | None:
    """The client's address: the peer's, or through our trusted proxies' X-Forwarded-For."""
    if not trusted_proxies:
        return request.remote
    return client_address(request.remote, request.header_values("x-forwarded-for"), trusted_proxies)
