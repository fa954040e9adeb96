"""OpenTelemetry setup and W3C trace-context propagation through NATS headers.

One trace covers a request: the client's span is the root, `traceparent` travels in the
message headers, and each service continues it. Spans export over OTLP/HTTP when
`KILN_OTLP_ENDPOINT` is set; otherwise they are created unsampled: ids still propagate (the
log and the messages name the request's trace), nothing is recorded.
"""

from __future__ import annotations

import logging

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

_provider: TracerProvider | None = None


def setup(service_name: str, otlp_endpoint: str | None) -> trace.Tracer:
    """Install the tracer provider once per process and return this service's tracer."""
    global _provider
    if _provider is None:
        # Without an exporter nobody will see a span: create them unsampled (ids for
        # propagation, nothing recorded), which costs a fraction of a recorded span.
        sampler = ParentBased(ALWAYS_ON) if otlp_endpoint else ALWAYS_OFF
        _provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = otlp_endpoint.rstrip("/") + "/v1/traces"
            _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(_provider)
    return trace.get_tracer(service_name)


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's `traceparent` to outgoing message headers."""
    propagate.inject(headers)
    return headers


def context_from_headers(headers: dict[str, str] | None) -> Context:
    return propagate.extract(headers or {})


def configure_logging(service_name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {service_name} %(levelname)s %(name)s: %(message)s",
    )
    return logging.getLogger(f"kiln.{service_name}")
