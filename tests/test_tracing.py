"""OpenTelemetry tracing, recorded with the SDK's in-memory exporter: a request's span continues
the client's traceparent and holds its stages; decode steps have spans; logs carry the trace id."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing
from service.api.app import create_app
from service.config import Settings
from service.logs import JsonFormatter, RequestIdFilter
from tests.conftest import wait_ready
from tests.onnx_models import lstm_language_model, write_model

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
X = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}


@pytest.fixture(scope="module")
def exporter():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    tracing.configure("none")  # the tests after this module run untraced


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("traced")
    write_model(root, "scale")
    lstm_language_model(root)
    return root


def serve(repo: Path, exporter: str) -> TestClient:
    return TestClient(create_app(Settings(repository=repo, log_json=False, otel_exporter=exporter)))


def by_name(spans, name: str) -> list:
    return [s for s in spans if s.name == name]


def test_a_request_span_continues_the_clients_trace_and_holds_the_queue_and_the_batch(repo: Path, exporter) -> None:
    with serve(repo, "provider") as client:
        wait_ready(client)
        exporter.clear()
        r = client.post("/v2/models/scale/infer", json=X, headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == trace.SpanKind.SERVER]
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the client's trace goes on
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert server.name == "POST /v2/models/{model}/infer"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["neuroserve.request_id"] == r.headers["x-request-id"]
    (queue,) = by_name(spans, "queue")
    (batch,) = by_name(spans, "batch")
    for child in (queue, batch):
        assert child.parent.span_id == server.context.span_id and child.context.trace_id == server.context.trace_id
        assert child.attributes["neuroserve.model"] == "scale"
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time
    assert batch.attributes["neuroserve.batch_size"] == 2
    assert queue.end_time == batch.start_time


def test_generation_has_a_decode_span_per_sequence_and_a_span_per_decode_step(repo: Path, exporter) -> None:
    with serve(repo, "provider") as client:
        wait_ready(client)
        exporter.clear()
        body = {"model": "tiny-lm", "prompt": ["Tom is", "Can you"], "max_tokens": 5, "logit_bias": {"2": -100}}
        r = client.post("/v1/completions", json=body, headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind == trace.SpanKind.SERVER]
    decodes = by_name(spans, "decode")
    assert len(decodes) == 2
    for decode in decodes:
        assert decode.parent.span_id == server.context.span_id
        assert decode.attributes["neuroserve.tokens"] == 5 and decode.attributes["neuroserve.steps"] >= 4
    (pre,) = by_name(spans, "preprocess")
    assert pre.parent.span_id == server.context.span_id
    steps = by_name(spans, "decode step")
    assert len(steps) >= 4 and all(s.attributes["neuroserve.model"] == "tiny-lm" for s in steps)
    assert all(s.parent is None and s.context.trace_id != server.context.trace_id for s in steps)  # traces of their own
    assert max(s.attributes["neuroserve.rows"] for s in steps) == 2


def test_log_lines_written_during_a_traced_request_carry_its_trace_id(exporter) -> None:
    tracing.configure("provider")
    record = logging.LogRecord("neuroserve", logging.INFO, __file__, 1, "inside", None, None)
    with tracing.TRACER.start_as_current_span("request") as span:
        RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    tracing.configure("none")
    untraced = logging.LogRecord("neuroserve", logging.INFO, __file__, 1, "outside", None, None)
    RequestIdFilter().filter(untraced)
    assert "trace_id" not in json.loads(JsonFormatter().format(untraced))


def test_with_tracing_off_nothing_is_recorded(repo: Path, exporter) -> None:
    with serve(repo, "none") as client:
        wait_ready(client)
        exporter.clear()
        assert client.post("/v2/models/scale/infer", json=X, headers={"traceparent": TRACEPARENT}).status_code == 200
    assert exporter.get_finished_spans() == ()


def test_an_exporter_whose_packages_are_missing_leaves_tracing_off(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_sdk(name, *args, **kwargs):
        if name.startswith("opentelemetry.sdk"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdk)
    assert tracing.configure("console") is False and not tracing.enabled()


def test_a_server_with_the_otlp_exporter_sends_its_spans_to_the_collector(tmp_path: Path) -> None:
    # The whole path, in a server process of its own (a process has one tracer provider): OTLP
    # over HTTP to a collector stand-in that decodes what it receives.
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from bench.harness import neuroserve

    received: list[ExportTraceServiceRequest] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf":
                received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    write_model(tmp_path, "scale")
    try:
        with neuroserve(
            tmp_path,
            NEUROSERVE_OTEL_EXPORTER="otlp",
            NEUROSERVE_OTEL_ENDPOINT=f"http://127.0.0.1:{collector.server_port}/v1/traces",
            NEUROSERVE_OTEL_SERVICE_NAME="neuroserve-test",
            OTEL_BSP_SCHEDULE_DELAY="100",
        ) as server:
            status, _, _ = server.request("POST", "/v2/models/scale/infer", X)
            assert status == 200
            deadline = time.monotonic() + 10
            names: set[str] = set()
            while time.monotonic() < deadline and not {"queue", "batch", "POST /v2/models/{model}/infer"} <= names:
                time.sleep(0.1)
                names = {s.name for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans}
    finally:
        collector.shutdown()
        collector.server_close()
    assert {"queue", "batch", "POST /v2/models/{model}/infer"} <= names
    resource = received[0].resource_spans[0].resource
    assert {(a.key, a.value.string_value) for a in resource.attributes} >= {("service.name", "neuroserve-test")}


def test_the_access_line_carries_a_well_formed_traceparent_and_no_other(repo: Path, caplog) -> None:
    # A 60,000-byte "traceparent" went into the access line whole (60,237 bytes), on every request.
    with serve(repo, "none") as client, caplog.at_level(logging.INFO, logger="neuroserve.access"):
        wait_ready(client)
        caplog.clear()
        assert client.get("/v2", headers={"traceparent": TRACEPARENT}).status_code == 200
        assert client.get("/v2", headers={"traceparent": "00-" + "a" * 60_000}).status_code == 200
    lines = [r for r in caplog.records if r.name == "neuroserve.access" and r.getMessage().startswith("GET /v2 ")]
    assert [r.traceparent for r in lines] == [TRACEPARENT, None]
    assert all(len(str(r.__dict__)) < 5_000 for r in lines)
