"""OpenTelemetry tracing: one server span per traced request, children for the work inside it,
W3C `traceparent` continued from the client and passed on to the upstream.

Spans go to a `BatchSpanProcessor`, which exports them over OTLP/HTTP from a thread of its own:
a slow or absent collector delays nothing and fails nothing. Whether a request is traced is
decided before the SDK is asked for anything (a sampled incoming `traceparent`, or the
`sample_ratio`), so the requests not traced cost one random number.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.base.traced import ChildSpan, SpanOpener
from gateway.config.projects import Project
from gateway.config.routes import Route
from gateway.config.settings import TracingSettings
from gateway.refusals.reasons import Reason

EXPORT_DELAY_MILLIS = 500  # how long finished spans wait to be sent together
EXPORT_TIMEOUT_SECONDS = 5


class Tracing:
    def __init__(self, settings: TracingSettings) -> None:
        self._ratio = settings.sample_ratio
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name})
        )
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, timeout=EXPORT_TIMEOUT_SECONDS)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MILLIS)
        )
        self._tracer = self._provider.get_tracer("gateway")
        self._propagator = TraceContextTextMapPropagator()

    def start(self, traceparent: str | None, tracestate: str | None) -> Span | None:
        """The request's server span, or None when the request is not traced."""
        if not _sampled(traceparent) and random.random() >= self._ratio:  # noqa: S311
            return None
        parent = None
        if traceparent is not None:
            carrier = {"traceparent": traceparent, "tracestate": tracestate or ""}
            parent = self._propagator.extract(carrier)
        return self._tracer.start_span("gateway.request", context=parent, kind=SpanKind.SERVER)

    def opener(self, parent: Span) -> SpanOpener:
        """What `gateway.base.traced.current` holds while `parent`'s request is served."""

        def child(name: str) -> ChildSpan:
            kind = SpanKind.CLIENT if name == "gateway.upstream" else SpanKind.INTERNAL
            span = self._tracer.start_span(name, context=set_span_in_context(parent), kind=kind)
            return _Child(span, self)

        return child

    def traceparent(self, span: Span) -> str:
        carrier: dict[str, Any] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        return str(carrier["traceparent"])

    def shutdown(self) -> None:
        """Sends what is waiting, within the export timeout (blocking: run it on a thread)."""
        self._provider.shutdown()


def _sampled(traceparent: str | None) -> bool:
    """A W3C `traceparent` whose flags say the caller records this trace."""
    if traceparent is None:
        return False
    flags = traceparent.strip().rpartition("-")[2]
    try:
        return len(flags) == 2 and int(flags, 16) & 1 == 1
    except ValueError:
        return False


class _Child:
    def __init__(self, span: Span, tracing: Tracing) -> None:
        self._span = span
        self._tracing = tracing

    @property
    def traceparent(self) -> str:
        return self._tracing.traceparent(self._span)

    def note(self, key: str, value: str | int) -> None:
        self._span.set_attribute(key, value)

    def end(self) -> None:
        self._span.end()


class Served(Protocol):
    """What a request became (`gateway.stages.exchange.Exchange`), as a span reports it."""

    route: Route | None
    project: Project | None
    reason: Reason | None
    mode: str
    decision: str | None


def end_server_span(span: Span, exchange: Served, status: int) -> None:
    """The request's attributes, as its access-log line has them, then the span's end."""
    route, project, reason = exchange.route, exchange.project, exchange.reason
    attributes: dict[str, str | int] = {
        "http.response.status_code": status,
        "gateway.mode": exchange.mode,
    }
    if route is not None:
        attributes["http.route"] = route.name
        attributes["gateway.upstream"] = route.upstream
    if project is not None:
        attributes["gateway.project"] = project.label
    if exchange.decision is not None:
        attributes["gateway.decision"] = exchange.decision
    if reason is not None:
        attributes["gateway.code"] = reason.code.name
        attributes["gateway.reason"] = reason.phrase
    span.set_attributes(attributes)
    span.end()
