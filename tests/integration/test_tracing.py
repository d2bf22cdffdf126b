"""Tracing: off by default and then nothing is made; on, a request's span holds its
authentication, the policy decision, the audit commit and the node call, continues the
caller's trace, and the node receives the trace in `traceparent`; OTLP over HTTP to a real
receiver."""

from __future__ import annotations

import dataclasses
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from charter.tracing import Tracing
from tests.batch_support import make_world
from tests.runtimes import app_for, runtime_for

MARKER = "zebra-marker-7"
CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": MARKER}]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_off_by_default_nothing_is_made(configured) -> None:  # type: ignore[no-untyped-def]
    tracing = runtime_for(configured).tracing
    assert not tracing.enabled and tracing.provider is None
    assert tracing.span("x") is tracing.span("y")  # one shared null context
    headers: dict[str, str] = {}
    tracing.inject(headers)
    assert headers == {}


def test_a_request_is_one_trace_that_reaches_the_node(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    world = make_world(configured, make_person)
    try:
        runtime = runtime_for(world.settings)
        exporter = InMemorySpanExporter()
        runtime.tracing = Tracing(world.settings, exporter=exporter)
        from charter.app import create_app

        client = create_app(runtime).test_client()
        r = client.post("/v1/chat/completions", json=CHAT,
                        headers={**world.headers, "traceparent": CALLER})
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        spans = {s.name: s for s in exporter.get_finished_spans()}
        assert set(spans) == {"POST /v1/chat/completions", "charter.authenticate",
                              "charter.policy.decide", "charter.audit.commit",
                              "charter.node.call"}, set(spans)
        root = spans["POST /v1/chat/completions"]
        assert f"{root.context.trace_id:032x}" == TRACE_ID  # the caller's trace, continued
        assert root.parent is not None and f"{root.parent.span_id:016x}" == "00f067aa0ba902b7"
        assert root.attributes["http.response.status_code"] == 200
        assert root.attributes["http.route"] == "/v1/chat/completions"
        for name in ("charter.authenticate", "charter.policy.decide", "charter.audit.commit",
                     "charter.node.call"):
            assert spans[name].parent.span_id == root.context.span_id, name
        decide = spans["charter.policy.decide"]
        assert decide.attributes["charter.policy"] == "dispatch"
        assert decide.attributes["charter.policy.allow"] is True
        assert spans["charter.audit.commit"].attributes["charter.audit.result"] == "written"
        call = spans["charter.node.call"]
        assert call.attributes["charter.node"] == "n1"
        # The node got the trace: same trace id, the node call's span as parent.
        sent = world.node.traceparents[-1]
        assert sent == f"00-{TRACE_ID}-{call.context.span_id:016x}-01", sent
        # Nothing of the request's content or credentials is in any span.
        text = repr([dict(s.attributes or {}) for s in spans.values()])
        assert MARKER not in text and world.key.split("_", 2)[2] not in text
        # A named route's span is named by its rule, not its path (bounded), and a stream's
        # ends when its answer does.
        exporter.clear()
        r = client.post("/tgi/m/generate_stream", json={"inputs": MARKER},
                        headers=world.headers)
        assert r.status_code == 200 and b"data:" in r.data
        r.close()  # what a server does after the last byte
        names = [s.name for s in exporter.get_finished_spans()]
        assert "POST /tgi/<name>/generate_stream" in names, names
        root = next(s for s in exporter.get_finished_spans()
                    if s.name == "POST /tgi/<name>/generate_stream")
        assert root.attributes["http.route"] == "/tgi/<name>/generate_stream"
        assert root.attributes["http.response.status_code"] == 200
        runtime.tracing.close()
    finally:
        world.node.stop()


def test_spans_are_exported_over_otlp_http(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    world = make_world(configured, make_person)
    try:
        settings = dataclasses.replace(
            world.settings,
            otel_endpoint=f"http://127.0.0.1:{server.server_address[1]}/v1/traces")
        app = app_for(settings)
        assert app.test_client().post("/v1/chat/completions", json=CHAT,
                                      headers=world.headers).status_code == 200
        app.extensions["charter.runtime"].tracing.flush()
        assert received, "no spans were exported"
        path, content_type, body = received[0]
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        exported = ExportTraceServiceRequest.FromString(body)
        names = {s.name for rs in exported.resource_spans for ss in rs.scope_spans
                 for s in ss.spans}
        assert "charter.policy.decide" in names and "POST /v1/chat/completions" in names
        service = {a.key: a.value.string_value
                   for a in exported.resource_spans[0].resource.attributes}
        assert service["service.name"] == "charter"
    finally:
        world.node.stop()
        server.shutdown()
