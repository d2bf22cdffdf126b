"""Tracing with OpenTelemetry: a span for each request and, inside it, its authentication,
the policy decision, the audit commit and the call to the node, whose request carries the
W3C `traceparent` (TGI and vLLM continue the trace). A caller's own `traceparent` is
continued too.

Off by default, and then free: no SDK is imported and every span() is one shared null
context. On (`CHARTER_OTEL_ENDPOINT`), each Runtime has its own tracer provider, exporting
OTLP over HTTP in batches from a background thread; nothing global is set, so two
runtimes in one process never meet. Span names and attributes are bounded (routes, not
paths; no prompt, no key, no token).
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charter.settings import Settings

_OFF = contextlib.nullcontext()


class Tracing:
    def __init__(self, settings: Settings, exporter: Any = None) -> None:
        """`exporter`: a span exporter to use instead of OTLP (tests: the SDK's in-memory
        one), exporting each span as it ends."""
        self.enabled = bool(settings.otel_endpoint) or exporter is not None
        self._tracer: Any = None
        self.provider: Any = None
        if not self.enabled:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": settings.otel_service_name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
                endpoint=settings.otel_endpoint, timeout=settings.otel_timeout_s)))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self.provider.get_tracer("charter")
        self._propagator = TraceContextTextMapPropagator()

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span (a null context when tracing is off)."""
        if self._tracer is None:
            return _OFF
        return self._tracer.start_as_current_span(name, attributes=attributes)  # type: ignore[no-any-return]

    def server_span(self, name: str, headers: Any, **attributes: Any
                    ) -> contextlib.AbstractContextManager[Any]:
        """A request's span, continuing the caller's trace if it sent `traceparent`."""
        if self._tracer is None:
            return _OFF
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(carrier=_Headers(headers))
        return self._tracer.start_as_current_span(  # type: ignore[no-any-return]
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add `traceparent` (and `tracestate`) of the current span to outgoing headers."""
        if self._tracer is not None:
            self._propagator.inject(headers)

    def flush(self) -> None:
        if self.provider is not None:
            self.provider.force_flush()

    def close(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class _Headers(dict[str, str]):
    """Incoming headers as the propagator reads them (lower-case names)."""

    def __init__(self, headers: Any) -> None:
        super().__init__((k.lower(), v) for k, v in headers.items())


def set_attributes(span: Any, **attributes: Any) -> None:
    """Attributes known only once the work is done (a decision, a status), on the span
    `with tracing.span(...) as span` gave (None when tracing is off)."""
    if span is not None:
        for key, value in attributes.items():
            span.set_attribute(key, value)
