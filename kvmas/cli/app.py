"""The `kvmas` command line.

    kvmas run "What is 2+3?"                       # single agent on the default model (qwen2.5-coder-0.5b)
    kvmas run --primitive review --comm latent --rounds 1 "..."
    kvmas trace show runs/trace.json
    kvmas models | kvmas bench ... | kvmas attribute ... | kvmas skills ... | kvmas pool ...
"""

from __future__ import annotations

import os
import sys

import typer

from kvmas.cli import (attribute_cmd, batch_cmd, bench_cmd, models_cmd, pool_cmd, run_cmd, serve_cmd, skills_cmd,
                       trace_cmd)
from kvmas.cli.boundary import BoundaryGroup, describe
from kvmas.cli.logs import setup_logging
from kvmas.cli.render import print_error

app = typer.Typer(cls=BoundaryGroup, help="kvmas: multi-agent LLM systems whose agents talk through KV caches.",
                  add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging, third-party warnings")) -> None:
    """kvmas: multi-agent LLM systems whose agents talk through KV caches."""
    setup_logging(verbose)


app.add_typer(trace_cmd.app, name="trace")

# Sub-apps live in their own modules under cli/.
app.add_typer(models_cmd.app, name="models")
app.add_typer(attribute_cmd.app, name="attribute")
app.add_typer(skills_cmd.app, name="skills")
app.add_typer(pool_cmd.app, name="pool")
app.add_typer(bench_cmd.app, name="bench")
app.command("feedback")(pool_cmd.feedback_cmd)
app.command("serve")(serve_cmd.serve)
bench_cmd.app.command("serve")(serve_cmd.bench_serve)
app.add_typer(batch_cmd.app, name="batch")

app.command("run", cls=run_cmd.RunCommand)(run_cmd.run)


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
