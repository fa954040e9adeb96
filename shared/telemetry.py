"""OpenTelemetry: traces through NATS headers, metrics on a Prometheus endpoint.

Traces. One trace covers a request: the client's span is the root, `traceparent` travels in
the message headers, and each service continues it. Spans export over OTLP/HTTP when
`KILN_OTLP_ENDPOINT` is set; otherwise they are created unsampled: ids still propagate (the
log and the messages name the request's trace), nothing is recorded. Each span carries
`service.name` as an attribute too (Phoenix keeps span attributes, not the resource), and
users appear only as a keyed hash (`user_ref`).

Every span says what kind it is (OpenTelemetry's SpanKind): the client's root span CLIENT,
a JetStream publish PRODUCER, a service handling a message CONSUMER, delivery's HTTP
handling SERVER, a call to Postgres or a bucket CLIENT, the rest INTERNAL. A span whose work
failed ends with an error status (`record_failure`, `mark_failed`).

Metrics. Each service serves its instruments at http://<KILN_METRICS_HOST>:<KILN_METRICS_PORT>/metrics
in the Prometheus text format (host 127.0.0.1 unless set; no port: no endpoint), without
the `otel_scope_*` labels the exporter would put on every series.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace import Status, StatusCode

# Buckets for the time histograms, in seconds: from a tiny model's batch up to 10 minutes (a
# 512×512, 50-step job renders for about 8 on a CPU). A value past the last bucket counts
# only in +Inf, where no quantile can be read from it.
SECONDS_UP_TO_10_MIN = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]

_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None


class _AttributesForTracingUIs(SpanProcessor):
    """Puts `service.name` and the span's kind on every span as attributes. Some tracing
    UIs keep span attributes only: Phoenix drops the resource, and its "kind" column is
    OpenInference's (LLM, tool, chain…), never OpenTelemetry's, so without
    `kiln.span_kind` it would show no kind at all."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        span.set_attribute("service.name", self.service_name)
        span.set_attribute("kiln.span_kind", span.kind.name.lower())

    def on_end(self, span: ReadableSpan) -> None:
        pass


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
            _provider.add_span_processor(_AttributesForTracingUIs(service_name))
            _provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500)
            )
        trace.set_tracer_provider(_provider)
    return trace.get_tracer(service_name)


def serve_metrics(service_name: str, port: int | None, host: str = "127.0.0.1") -> metrics.Meter:
    """Serve this process's metrics on `port` (Prometheus text format) and return its meter.
    Without a port the instruments still work; nothing serves them."""
    global _meter_provider
    if _meter_provider is None:
        readers = []
        if port:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            try:
                start_http_server(port, addr=host)
                # No `otel_scope_*` labels: each service has one meter, so they would only
                # repeat its name on every series.
                readers.append(PrometheusMetricReader(scope_info_enabled=False))
            except OSError as error:  # the port is taken: serve without metrics, say so
                logging.getLogger(f"kiln.{service_name}").warning("no metrics endpoint on :%d: %s", port, error)
        _meter_provider = MeterProvider(
            resource=Resource.create({"service.name": service_name}), metric_readers=readers
        )
        metrics.set_meter_provider(_meter_provider)
    return metrics.get_meter(f"kiln.{service_name}")


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def record_failure(span: trace.Span, error: BaseException) -> None:
    """The span's work raised: keep the exception on it and end it as failed, so a tracing
    UI shows it as an error, not only as an event inside a span that looks fine."""
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def mark_failed(span: trace.Span, description: str) -> None:
    """The span's work failed without an exception (a render the pipeline refused, a
    request that ended as failed): end it as failed, saying why."""
    span.set_status(Status(StatusCode.ERROR, description))


USER_REF_KEY_FILE = Path("keys") / "user-ref.key"  # in the data folder; the launcher makes it
_user_ref_key: bytes | None = None


def use_user_ref_key(data_dir: Path) -> None:
    """Hash user ids with the deployment's key from now on (the services call this at start)."""
    global _user_ref_key
    try:
        _user_ref_key = (data_dir / USER_REF_KEY_FILE).read_bytes()
    except FileNotFoundError:
        _user_ref_key = None


def user_ref(user_id: str) -> str:
    """How a user appears in traces: an HMAC of their id with the deployment's key, which
    groups one user's requests without naming them, and which nobody without the key can
    test a guessed id against (a plain hash could be). '' where the key is not at hand (a
    client away from the data folder): such a span names no user at all."""
    if _user_ref_key is None:
        return ""
    return hmac.new(_user_ref_key, user_id.encode(), hashlib.sha256).hexdigest()[:16]


def user_attributes(user_id: str) -> dict[str, str]:
    """The span attribute naming a user, where the key is at hand."""
    ref = user_ref(user_id)
    return {"kiln.user": ref} if ref else {}


def trace_id_of(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def trace_id_in(headers: dict[str, str] | None) -> str | None:
    """The trace a message was published in, from its `traceparent`; None without one."""
    context = trace.get_current_span(context_from_headers(headers)).get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def inject_headers(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Add the `traceparent` of the current span (or of `context`) to outgoing headers."""
    propagate.inject(headers, context=context)
    return headers


def context_from_headers(headers: dict[str, str] | None) -> Context:
    return propagate.extract(headers or {})


def configure_logging(service_name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {service_name} %(levelname)s %(name)s: %(message)s",
    )
    return logging.getLogger(f"kiln.{service_name}")
