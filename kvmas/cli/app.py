"""The `kvmas` command line.

    kvmas run "What is 2+3?"                       # single agent on the embedded model
    kvmas run --primitive review --comm latent "..."
    kvmas trace show runs/trace.json
    kvmas models | kvmas bench ... | kvmas attribute ... | kvmas skills ... | kvmas pool ...
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import typer
from rich.text import Text

from kvmas.cli import attribute_cmd, bench_cmd, models_cmd, pool_cmd, serve_cmd, skills_cmd
from kvmas.cli.boundary import BoundaryGroup, describe
from kvmas.cli.options import DEVICE, DTYPE
from kvmas.cli.render import clean, console as make_console, print_error
from kvmas.errors import BadInputError, KvmasError

app = typer.Typer(cls=BoundaryGroup, help="kvmas: multi-agent LLM systems whose agents talk through KV caches.",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
trace_app = typer.Typer(help="Inspect run traces.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")

# Sub-apps live in their own modules under cli/.
app.add_typer(models_cmd.app, name="models")
app.add_typer(attribute_cmd.app, name="attribute")
app.add_typer(skills_cmd.app, name="skills")
app.add_typer(pool_cmd.app, name="pool")
app.add_typer(bench_cmd.app, name="bench")
app.command("feedback")(pool_cmd.feedback_cmd)
app.command("serve")(serve_cmd.serve)
bench_cmd.app.command("serve")(serve_cmd.bench_serve)

@app.command()
def run(
    question: str = typer.Argument(..., help="the question to answer"),
    primitive: str = typer.Option("single", "--primitive", "-p", help="single | review | vote | plan"),
    comm: str = typer.Option("latent", "--comm", "-c", help="latent | text"),
    model: str = typer.Option(None, "--model", "-m", help="registry name or local HF dir (default: embedded)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="decode budget per speaking agent"),
    latent_steps: int = typer.Option(None, "--latent-steps", help="latent steps per agent (primitive default)"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (greedy decoding ignores it)"),
    temperature: float = typer.Option(0.0, "--temperature"),
    trace: Path = typer.Option(None, "--trace", help="write the run trace (JSON) here"),
    pipeline: Path = typer.Option(None, "--pipeline", help="run a pipeline spec (JSON) instead of one primitive"),
    auto: bool = typer.Option(False, "--auto", help="let the organizer compose a pipeline for this question"),
    show_trace: bool = typer.Option(False, "--show-trace", help="render the trace after the answer"),
    device: str = DEVICE,
    dtype: str = DTYPE,
) -> None:
    """Answer a question with one primitive (or a pipeline) and print the answer and token usage.

    The answer is printed before the trace is written, so a trace path that cannot be written costs an error
    line and a non-zero exit, never the answer."""
    from kvmas.cli.render import print_trace, usage_line

    console = make_console()
    if not question.strip():
        raise BadInputError("empty question")
    from kvmas.agents.model import Model

    with console.status("loading model…"):
        m = Model.load(model, device=device, dtype=dtype)
    if pipeline is not None or auto:
        result = _run_pipeline(question, m, pipeline, auto, seed, max_new_tokens)
    else:
        from kvmas.primitives import build

        params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        if latent_steps is not None:
            params["latent_steps"] = latent_steps
        if primitive != "single":
            params["comm"] = comm
        prim = build(primitive, **params)
        with console.status(f"running {prim.method}…"):
            result = prim(question, model=m, seed=seed)
    console.print(Text.assemble(("answer:", "bold green"), " ", clean(result.answer.strip())))
    console.print(Text(f"{clean(result.trace.method)} · {usage_line(result.usage)} · {result.trace.wall_s:.2f}s"
                       f" · run {clean(result.trace.run_id)}", style="dim"))
    if show_trace:
        print_trace(result.trace, console)
    if trace is not None:
        result.trace.save(trace)  # an OutputError here reaches the error boundary: one line, exit 1
        console.print(Text(f"trace written to {clean(trace)}", style="dim"))


def _run_pipeline(question, model, pipeline, auto, seed, max_new_tokens):
    try:
        organizer = importlib.import_module("kvmas.organizer")
    except ModuleNotFoundError as exc:  # pragma: no cover - the organizer ships with kvmas
        raise KvmasError("the organizer is not available in this install") from exc
    if auto:
        return organizer.run_auto(question, model=model, seed=seed, max_new_tokens=max_new_tokens)
    return organizer.run_pipeline(str(pipeline), question, model=model, seed=seed)


@trace_app.command("show")
def trace_show(
    file: Path = typer.Argument(..., help="a trace JSON written by --trace"),
    full: bool = typer.Option(False, "--full", help="show whole texts instead of one-line snippets"),
) -> None:
    """Render a trace: steps per agent with usage, timings, provenance and texts."""
    from kvmas.cli.render import print_trace
    from kvmas.trace import Trace

    print_trace(Trace.load(file), make_console(), full_text=full)


def main() -> None:
    """Console-script entry point: anything raised outside a command body (the group boundary handles the
    rest) still becomes one line and a non-zero exit code."""
    try:
        app()
    except Exception as exc:
        if os.environ.get("KVMAS_DEBUG") or isinstance(exc, SystemExit):
            raise
        message, code = describe(exc)
        print_error(message)
        sys.exit(code)


if __name__ == "__main__":
    main()
