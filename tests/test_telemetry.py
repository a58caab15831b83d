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
