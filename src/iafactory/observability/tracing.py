"""Optional OpenTelemetry tracing: a server span per request (FastAPI instrumentation) with the
tenant as an attribute, and a client span per database round trip (psycopg instrumentation).

Imported only when tracing is enabled (IAFACTORY_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT);
the packages come with `pip install 'iafactory[otel]'`. Each worker process sets up its own
provider and exporter (create_app runs in the worker).

Statements: a tenant scope's round trip (`iafactory.db.scope`, libpq pipeline mode, which
psycopg's instrumentation does not see) gets a span of its own whose `db.statement` lists the
statements sent, with `$n` placeholders: parameters are never recorded. The `SET LOCAL` values
(tenant, user, client IP) and any literal written into a statement still are text, so every string
literal of `db.statement` / `db.query.text` is replaced by '?' before a span leaves the process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from iafactory.config import Settings
from iafactory.db import scope

INSTALL_HINT = "pip install 'iafactory[otel]'"
_STRING_LITERAL = re.compile(r"'(?:[^'\\]|''|\\.)*'")
_STATEMENT_KEYS = ("db.statement", "db.query.text")


def redact_sql(statement: str) -> str:
    """Every quoted literal becomes '?': the statement's shape stays, the data goes."""
    return _STRING_LITERAL.sub("'?'", statement)


@dataclass
class Tracing:
    """What create_app keeps: the per-request hook and how to stop."""

    annotate: Callable[[Mapping[str, Any], str], None]
    shutdown: Callable[[], None]


def _import_error(err: ImportError) -> RuntimeError:
    return RuntimeError(
        f"tracing is enabled (IAFACTORY_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT is set) but "
        f"OpenTelemetry is not installed ({err.name} is missing): {INSTALL_HINT}"
    )


def otlp_exporter(endpoint: str) -> Any:
    """OTLP over HTTP/protobuf (port 4318, `/v1/traces` appended), or gRPC when
    OTEL_EXPORTER_OTLP_PROTOCOL=grpc."""
    import os

    try:
        if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter(endpoint=endpoint)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as err:
        raise _import_error(err) from err
    url = endpoint.rstrip("/")
    return OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces")


def instrument(app: FastAPI, settings: Settings, exporter: Any = None) -> Tracing:
    """Trace `app` and every psycopg connection opened afterwards. `exporter`: a span exporter
    (tests pass an in-memory one, exported synchronously); default OTLP to the configured endpoint."""
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
        from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as err:
        raise _import_error(err) from err

    class RedactingProcessor(SpanProcessor):
        """Hands spans on with their SQL literals replaced (an ended span is read-only: a copy)."""

        def __init__(self, inner: SpanProcessor) -> None:
            self.inner = inner

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            self.inner.on_start(span, parent_context=parent_context)

        def on_end(self, span: ReadableSpan) -> None:
            attrs = span.attributes or {}
            if any(isinstance(attrs.get(k), str) for k in _STATEMENT_KEYS):
                redacted = {
                    k: redact_sql(v) if k in _STATEMENT_KEYS and isinstance(v, str) else v for k, v in attrs.items()
                }
                span = ReadableSpan(
                    name=span.name,
                    context=span.context,
                    parent=span.parent,
                    resource=span.resource,
                    attributes=redacted,
                    events=span.events,
                    links=span.links,
                    kind=span.kind,
                    status=span.status,
                    start_time=span.start_time,
                    end_time=span.end_time,
                    instrumentation_scope=span.instrumentation_scope,
                )
            self.inner.on_end(span)

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis)

    in_memory = exporter is not None
    if exporter is None:
        exporter = otlp_exporter(settings.otlp_endpoint or "")
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still apply (Resource.create reads them).
    provider = TracerProvider(resource=Resource.create({"service.name": "iafactory"}))
    provider.add_span_processor(
        RedactingProcessor(SimpleSpanProcessor(exporter) if in_memory else BatchSpanProcessor(exporter))
    )
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls="/healthz,/readyz,/metrics")
    psycopg_instrumentor = PsycopgInstrumentor()
    psycopg_instrumentor.instrument(tracer_provider=provider)
    db_tracer = provider.get_tracer("iafactory.db")

    def round_trip(steps: Sequence[tuple[bytes, Any]]) -> Any:
        statement = ";\n".join(query.decode() for query, _ in steps)
        return db_tracer.start_as_current_span(
            "postgresql round trip",
            kind=trace.SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "db.statement": statement, "db.statement_count": len(steps)},
        )

    scope.round_trip_tracer = round_trip

    def annotate(who: Mapping[str, Any], route: str) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        span.set_attribute("http.route", route)
        for key in ("tenant_id", "request_id", "user_id", "api_key_id"):
            if who.get(key) is not None:
                span.set_attribute(f"iafactory.{key}", str(who[key]))

    def shutdown() -> None:
        FastAPIInstrumentor.uninstrument_app(app)
        psycopg_instrumentor.uninstrument()
        scope.round_trip_tracer = None
        provider.shutdown()

    return Tracing(annotate=annotate, shutdown=shutdown)
