"""What one request became, gathered as the stages run: for its answer, its metrics and its
access-log record."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from opentelemetry.trace import Span

from gateway.config.projects import Project
from gateway.config.routes import Route
from gateway.http.messages import Request, new_request_id
from gateway.refusals.reasons import Reason

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(request: Request) -> str:
    """The client's `X-Request-Id` when it is one we can echo unescaped, else a new one."""
    incoming = request.header("x-request-id")
    if incoming is not None and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return new_request_id()


@dataclass(slots=True)
class Exchange:
    request_id: str
    route: Route | None
    project: Project | None
    project_id: str | None
    mode: str
    decision: str | None
    decision_reason: Reason | None  # why auth refused (or would have): the metric's code
    reason: Reason | None  # why the answer is an error, whatever stage gave it
    upstream_status: int | None
    client: str | None
    cors_headers: dict[str, str] | None  # for an Origin the route's `cors` lists
    token_fingerprint: str | None  # 12 hex digits of the token's SHA-256, for the log
    parsed: bool  # False: the HTTP parser refused it; method and path are unknown
    authenticating: bool  # past route and size checks: a refusal is an auth decision
    span: Span | None  # the server span, when the request is traced

    # Written out, as for the other classes made once a request or more: mypyc compiles an
    # __init__ of the class's own, not the one @dataclass generates at import, which runs as
    # Python and sets each field through its descriptor (four times slower).
    def __init__(
        self,
        request_id: str,
        *,
        route: Route | None = None,
        project: Project | None = None,
        mode: str = "disabled",
        parsed: bool = True,
    ) -> None:
        self.request_id = request_id
        self.route = route
        self.project = project
        self.project_id = None
        self.mode = mode
        self.decision = None
        self.decision_reason = None
        self.reason = None
        self.upstream_status = None
        self.client = None
        self.cors_headers = None
        self.token_fingerprint = None
        self.parsed = parsed
        self.authenticating = False
        self.span = None
