"""OpenTelemetry export of a real run through the SDK's in-memory exporter: spans, parents, tokens, links."""

import json

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the telemetry extra (make installs it)")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from kvmas.cli.app import app  # noqa: E402
from kvmas.primitives import Review  # noqa: E402
from kvmas.telemetry import export_trace  # noqa: E402
from kvmas.testing import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def trace():
    return Review(rounds=1, max_new_tokens=4, latent_steps=2)("What is 2+3?", model=tiny_model("qwen")).trace


def test_one_span_per_step_under_the_run_span_with_usage_and_provenance(trace):
    mem = InMemorySpanExporter()
    export_trace(trace, mem)
    spans = mem.get_finished_spans()
    root = next(s for s in spans if s.parent is None)
    steps = sorted((s for s in spans if s.parent is not None), key=lambda s: s.attributes["kvmas.step.index"])
    assert len(spans) == len(trace.steps) + 1 and root.name == "invoke_agent latent:review"
    assert all(s.parent.span_id == root.context.span_id and s.context.trace_id == root.context.trace_id
               for s in steps)
    for span, step in zip(steps, trace.steps):
        a = span.attributes
        assert a["gen_ai.agent.name"] == step.agent and a["kvmas.step.action"] == step.action
        assert a["gen_ai.usage.input_tokens"] == step.usage.prefilled + step.usage.reused
        assert a["gen_ai.usage.output_tokens"] == step.usage.generated
        assert a["kvmas.usage.latent"] == step.usage.latent
        assert span.start_time <= span.end_time and root.start_time <= span.start_time <= root.end_time
    speak = next(s for s in steps if s.attributes["kvmas.step.action"] == "speak")
    assert speak.attributes["gen_ai.operation.name"] == "chat" and speak.name == "chat solver"
    assert root.attributes["gen_ai.usage.output_tokens"] == trace.usage.generated
    # provenance: each link points at the span of the step that wrote the segment read
    by_id = {s.context.span_id: s for s in steps}
    critic_read = next(s for s in steps if s.name == "read critic")
    linked = {by_id[ln.context.span_id].attributes["kvmas.step.index"]: ln.attributes["kvmas.segment"]
              for ln in critic_read.links}
    for index, seg in linked.items():
        assert seg in trace.steps[index].writes and seg in trace.steps[critic_read.attributes["kvmas.step.index"]].reads
    assert any(trace.steps[i].agent == "solver" for i in linked)


def test_cli_writes_an_otlp_json_file(trace, tmp_path):
    path = trace.save(tmp_path / "t.json")
    res = CliRunner().invoke(app, ["trace", "export", str(path), "--otlp", str(tmp_path / "t.otlp.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "t.otlp.json").read_text())
    spans = [s for rs in data["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
    assert len(spans) == len(trace.steps) + 1 and f"{len(spans)} spans" in res.output
    assert {a["key"] for a in spans[0]["attributes"]} >= {"gen_ai.operation.name", "gen_ai.usage.input_tokens"}


def test_cli_sends_the_spans_to_an_otlp_endpoint(trace, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, ExportTraceServiceRequest]] = []

    class Collector(BaseHTTPRequestHandler):  # an OTLP/HTTP receiver on loopback, as Jaeger or Phoenix run one
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, ExportTraceServiceRequest.FromString(body)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = trace.save(tmp_path / "t.json")
        url = f"http://127.0.0.1:{server.server_port}/v1/traces"
        res = CliRunner().invoke(app, ["trace", "export", str(path), "--otlp", url])
    finally:
        server.shutdown()
        server.server_close()
    assert res.exit_code == 0, res.output
    spans = [s for _, req in received for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert {p for p, _ in received} == {"/v1/traces"} and len(spans) == len(trace.steps) + 1
    assert {s.name for s in spans} >= {"invoke_agent latent:review", "chat solver"}


def test_an_endpoint_that_refuses_is_an_error_not_a_success(trace, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = trace.save(tmp_path / "t.json")
    res = CliRunner().invoke(app, ["trace", "export", str(path), "--otlp", f"http://127.0.0.1:{port}/v1/traces"])
    assert res.exit_code != 0 and "exported" not in res.output and str(port) in res.output
