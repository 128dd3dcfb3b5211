"""OpenTelemetry tracing for both servers, off unless an OTLP endpoint is configured.

On: spans go to an OTLP/gRPC collector in batches; each RPC gets a server span that continues the
caller's trace (W3C `traceparent` metadata, which the client library sends), so one client call shows
up as one trace across embedder and searcher; the servicers add what they did as span attributes
(`lookalike.*`); and log lines carry `trace=<id> span=<id>`. Off: the OpenTelemetry API is a no-op.
"""
from __future__ import annotations

import atexit
import logging
from typing import Any, Callable

import grpc
from opentelemetry import trace

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TRACED_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [trace=%(otel_trace_id)s span=%(otel_span_id)s]: %(message)s"


def configure_logging() -> None:
    """The servers' log format (start_tracing adds trace ids to it)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def start_tracing(service_name: str, otlp_endpoint: str) -> grpc.ServerInterceptor:
    """Exports spans to `otlp_endpoint` (http://host:4317 plaintext, https:// TLS) as `service_name`.

    Returns the server interceptor that opens a span per RPC; it must come first among the interceptors so
    that everything after it (metrics, auth, the servicer) runs inside the span.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import filters, server_interceptor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint,
                                                                    insecure=otlp_endpoint.startswith("http://"))))
    trace.set_tracer_provider(provider)
    # Spans still in the batch are sent when the process exits after a graceful stop.
    atexit.register(provider.shutdown)
    _log_trace_ids()
    logging.getLogger(__name__).info("tracing: spans of %s go to %s", service_name, otlp_endpoint)
    # Health calls are left out: the interceptor's wrapper of Health.Watch blocks, so each open watch (no token
    # needed) held a handler thread and a few froze the server; and probes every few seconds are not worth spans.
    return server_interceptor(tracer_provider=provider, filter_=filters.negate(filters.health_check()))


def _log_trace_ids() -> None:
    previous = logging.getLogRecordFactory()

    def record_with_trace_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        context = trace.get_current_span().get_span_context()
        record.otel_trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        record.otel_span_id = format(context.span_id, "016x") if context.is_valid else "-"
        return record

    logging.setLogRecordFactory(record_with_trace_ids)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(TRACED_LOG_FORMAT))


def annotate(attributes: Callable[[], dict[str, Any]]) -> None:
    """Adds the `lookalike.<name>` attributes `attributes()` returns to the current RPC's span. They are
    computed only when a span records, so RPCs pay nothing for them while tracing is off."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"lookalike.{name}": value for name, value in attributes().items()})
