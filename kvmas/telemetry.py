"""OpenTelemetry export of a run trace, with the GenAI semantic conventions (the ``telemetry`` extra).

One span per run (``invoke_agent``), one child span per step: the agent, the action and the token counts as
attributes (``gen_ai.usage.input_tokens`` = prefilled + reused, ``gen_ai.usage.output_tokens`` = generated, the
kvmas counters under ``kvmas.usage.*``), and the provenance as links: a step that reads a segment links to the
step that wrote it. A trace records durations, not start times, so the steps are laid end to end from the
run's start. The spans open in Jaeger, Phoenix or Langfuse.

>>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
>>> from kvmas.trace import Step, Trace, Usage
>>> t = Trace(method="latent:review", question="2+3?")
>>> _ = t.add(Step(agent="solver", role="solver", action="read", writes=[0], usage=Usage(prefilled=9)))
>>> _ = t.add(Step(agent="critic", role="critic", action="speak", reads=[0], usage=Usage(generated=3)))
>>> mem = InMemorySpanExporter()
>>> [s.name for s in export_trace(t, mem)]
['read solver', 'chat critic', 'invoke_agent latent:review']
"""

from __future__ import annotations

from datetime import datetime

from kvmas.errors import BadInputError, KvmasError
from kvmas.trace import Trace

# what each recorded action is, in the conventions' words (speech is a chat completion; the rest are kvmas')
OPERATION = {"speak": "chat", "read": "read", "think": "think", "score": "score", "merge": "merge",
             "organize": "organize"}


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _start_ns(trace: Trace) -> int:
    try:
        return _ns(datetime.fromisoformat(trace.created.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise BadInputError(f"trace {trace.run_id}: created {trace.created!r} is not a timestamp") from None


def export_trace(trace: Trace, exporter, where: str | None = None) -> list:
    """Send ``trace`` to a span exporter (OTLP, in-memory, console, ...) in one batch; returns the spans.

    An exporter that does not take them (an endpoint unreachable or refusing, after the exporter's own
    retries) is a :class:`KvmasError` naming ``where`` (the target), never a silent success."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.trace import Link, SpanKind, set_span_in_context

    kept: list = []

    class _Keep(SpanProcessor):
        def on_end(self, span) -> None:
            kept.append(span)

    provider = TracerProvider(resource=Resource.create({"service.name": "kvmas"}))
    provider.add_span_processor(_Keep())
    tracer = provider.get_tracer("kvmas", trace.versions.get("kvmas"))
    model = str(trace.model.get("name", ""))
    t0 = _start_ns(trace)
    root = tracer.start_span(f"invoke_agent {trace.method}", kind=SpanKind.INTERNAL, start_time=t0, attributes={
        "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "kvmas", "gen_ai.agent.name": trace.method,
        "gen_ai.conversation.id": trace.run_id, "gen_ai.request.model": model, "kvmas.seed": trace.seed,
        "kvmas.question": trace.question, "kvmas.answer": trace.answer or "",
        "gen_ai.usage.input_tokens": trace.usage.prefilled + trace.usage.reused,
        "gen_ai.usage.output_tokens": trace.usage.generated,
        **{f"kvmas.usage.{k}": v for k, v in trace.usage.model_dump().items()}})
    parent = set_span_in_context(root)
    writer: dict[int, object] = {}  # segment id -> the span context of the step that wrote it
    at = t0
    for s in trace.steps:
        links = [Link(writer[i], {"kvmas.segment": i}) for i in s.reads if i in writer]
        op = OPERATION.get(s.action, s.action)
        span = tracer.start_span(f"{op} {s.agent}", context=parent, start_time=at, links=links, attributes={
            "gen_ai.operation.name": op, "gen_ai.agent.name": s.agent, "gen_ai.request.model": model,
            "gen_ai.usage.input_tokens": s.usage.prefilled + s.usage.reused,
            "gen_ai.usage.output_tokens": s.usage.generated,
            **{f"kvmas.usage.{k}": v for k, v in s.usage.model_dump().items()},
            "kvmas.step.index": s.index, "kvmas.step.role": s.role, "kvmas.step.action": s.action,
            "kvmas.step.rows": s.rows, "kvmas.step.reads": s.reads, "kvmas.step.writes": s.writes})
        at += _ns(s.wall_s)
        span.end(end_time=at)
        for i in s.writes:
            writer.setdefault(i, span.get_span_context())
    root.end(end_time=max(at, t0 + _ns(trace.wall_s)))
    provider.shutdown()
    try:
        result = exporter.export(kept)  # one request to an endpoint, not one per span
    finally:
        exporter.shutdown()
    if result is not SpanExportResult.SUCCESS:
        raise KvmasError(f"{where or type(exporter).__name__} did not take the {len(kept)} spans of run {trace.run_id} (unreachable or "
                         "refused; -v shows the exporter's messages)")
    return kept


def otlp_exporter(target: str):
    """The exporter for ``target``: an ``http(s)://`` OTLP endpoint, else a file for OTLP/JSON."""
    try:
        if target.startswith(("http://", "https://")):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=target)
        return OTLPJsonFile(target)
    except ImportError:
        raise KvmasError('OpenTelemetry is not installed: pip install "kvmas[telemetry]"') from None


class OTLPJsonFile:
    """A span exporter writing one OTLP/JSON ``ExportTraceServiceRequest`` (what a collector's file receiver
    and most viewers import) to a file, atomically, on shutdown."""

    def __init__(self, path: str):
        self.path, self.spans = path, []

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        from google.protobuf.json_format import MessageToJson
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        from kvmas.paths import atomic_write_text

        atomic_write_text(self.path, MessageToJson(encode_spans(self.spans)))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
