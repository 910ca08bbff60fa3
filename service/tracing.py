"""OpenTelemetry tracing: a span per request and for its stages, off unless configured.

``NEUROSERVE_OTEL_EXPORTER`` picks where spans go: ``none`` (the default: nothing is recorded, and
the request path does not even look at ``traceparent``), ``otlp`` (OTLP over HTTP to
``NEUROSERVE_OTEL_ENDPOINT``, or the standard ``OTEL_EXPORTER_OTLP_*`` variables), ``console``, or
``provider`` (the tracer provider the process already has, set by an embedding application or a
test). The SDK and the OTLP exporter are the optional ``tracing`` extra
(``pip install 'neuroserve[tracing]'``); the API alone (a dependency) records nothing.

Spans (parent first): the request (``POST /v1/sentiment``, a server span that continues the
client's W3C ``traceparent``) > ``preprocess`` (decoding images, tokenising) > ``queue`` (waiting
for a batch) and ``batch`` (the batch run, with its size) > ``postprocess``; for step-level tasks a
``decode`` span per sequence (its steps and queue time) and a ``decode step`` span per decoder
step (its rows; a trace of its own, since one step serves many requests). Log lines carry the
trace id (``trace_id``) of the request they belong to.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

TRACER = trace.get_tracer("neuroserve")
_enabled = False


def enabled() -> bool:
    return _enabled


def configure(exporter: str, *, endpoint: str | None = None, service_name: str = "neuroserve") -> bool:
    """Set up the exporter named (see the module); False (and tracing off) when it is ``none`` or
    its packages are missing."""
    global _enabled
    _enabled = False
    if exporter == "none":
        return False
    if exporter == "provider":
        _enabled = True
        return True
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        chosen: SpanExporter
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
        else:
            chosen = ConsoleSpanExporter()
    except ImportError as exc:
        log.error("tracing is off: NEUROSERVE_OTEL_EXPORTER=%s needs the tracing extra (%s)", exporter, exc)
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(chosen))
    trace.set_tracer_provider(provider)
    _enabled = True
    return True


@contextlib.contextmanager
def server_span(method: str, path: str, headers: list[tuple[bytes, bytes]], request_id: str) -> Iterator[Any]:
    """The request's span, continuing the client's ``traceparent`` (and ``tracestate``)."""
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}
    attributes = {"http.request.method": method, "url.path": path, "neuroserve.request_id": request_id}
    with TRACER.start_as_current_span(
        f"{method} {path}", context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span


def finish_server_span(span: Any, status: int, route: str | None) -> None:
    if route:
        span.update_name(f"{span.name.split(' ', 1)[0]} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


@contextlib.contextmanager
def stage(name: str, **attributes: Any) -> Iterator[None]:
    """A span for a stage of the current request (``preprocess``, ``postprocess``)."""
    if not _enabled:
        yield
        return
    with TRACER.start_as_current_span(name, attributes=attributes):
        yield


def record(name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any], *, root: bool = False) -> None:
    """A span of a stage that already happened (times from the batcher's or decoder's own
    measurements): a child of the current span, or a trace of its own with ``root``."""
    if not _enabled:
        return
    context = trace.set_span_in_context(trace.INVALID_SPAN) if root else None
    span = TRACER.start_span(name, context=context, start_time=start_ns, attributes=dict(attributes))
    span.end(end_time=end_ns)


def decode_span(model: str, stats: Any, *, tokens: int) -> None:
    """A sequence's ``decode`` span, ending now: its wait for a row and its decoding (``stats``:
    the step scheduler's DecodeStats)."""
    if not _enabled:
        return
    end = time.time_ns()
    attributes = {
        "neuroserve.model": model,
        "neuroserve.queue_ms": round(stats.queue_s * 1000, 3),
        "neuroserve.steps": stats.steps,
        "neuroserve.max_rows": stats.max_rows,
        "neuroserve.tokens": tokens,
    }
    record("decode", end - int((stats.queue_s + stats.decode_s) * 1e9), end, attributes)


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), if a trace is being recorded."""
    if not _enabled:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def now_ns() -> int:
    return time.time_ns()
