"""`kvmas trace`: read run traces.

    kvmas trace show runs/trace.json                     # every step: agent, action, tokens, ms, texts
    kvmas trace show runs/trace.json --agent critic --steps 3-7 --full
    kvmas trace export runs/trace.json --otlp runs/trace.otlp.json    # or --otlp http://localhost:4318/v1/traces
"""

from __future__ import annotations

from pathlib import Path

import typer

from kvmas.cli.render import console, pick_steps, print_trace, say

app = typer.Typer(help="Inspect run traces.", no_args_is_help=True, add_completion=False)


@app.command("show")
def show(
    file: Path = typer.Argument(..., help="a trace JSON written by --trace"),
    full: bool = typer.Option(False, "--full", help="show whole texts instead of one-line snippets"),
    steps: str = typer.Option(None, "--steps", help="only these steps: 3, 2-5 or 0,4-6"),
    agent: str = typer.Option(None, "--agent", help="only this agent's steps"),
) -> None:
    """Render a trace: steps with nonzero usage, timings, labelled provenance and the texts read and written."""
    from kvmas.trace import Trace

    trace = Trace.load(file)
    chosen = None if steps is None and agent is None else pick_steps(trace, steps, agent)
    print_trace(trace, console(), full_text=full, steps=chosen)


@app.command("export")
def export(
    file: Path = typer.Argument(..., help="a trace JSON written by --trace"),
    otlp: str = typer.Option(..., "--otlp", help="an OTLP/JSON file to write, or an http(s):// OTLP endpoint "
                             "(e.g. http://localhost:4318/v1/traces)"),
) -> None:
    """Export a trace as OpenTelemetry spans (GenAI conventions): a run span, a span per step, provenance links."""
    from kvmas.telemetry import export_trace, otlp_exporter
    from kvmas.trace import Trace

    trace = Trace.load(file)
    spans = export_trace(trace, otlp_exporter(otlp), where=otlp)
    say(f"{len(spans)} spans of run {trace.run_id} exported to {otlp}")
