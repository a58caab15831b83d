"""`kvmas run`: answer a question with one primitive (or a pipeline), live.

    kvmas run "What is 2+3?"                                   # single agent on the default model
    kvmas run -p review -c latent --rounds 1 "Tom has 3 boxes ..."
    kvmas run -p vote --n 5 --merge-policy rerotate "..." --json
    kvmas run --from-state runs/state.safetensors "and then?"  # continue a saved LatentState

While it runs, each step is shown as it finishes (agent, action, tokens, ms) and the speaking agent's tokens
as they are decoded; ``--quiet`` prints the answer alone, ``--json`` one machine-readable object.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from dataclasses import replace
from typing import Literal

import typer
from rich.text import Text
from typer.core import TyperCommand

from kvmas.cli.backend import BACKEND, BASE_URL, open_backend
from kvmas.cli.options import DEVICE, DTYPE
from kvmas.cli.render import agent_table, clean, console as make_console, print_json, print_trace, usage_line
from kvmas.errors import BadInputError


class RunCommand(TyperCommand):
    """``kvmas run`` with choices read from the package when the command is parsed or its help shown (so that
    ``kvmas --help`` imports none of it): the primitives, the comm modes and the merge policies."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            load = _CHOICES.get(p.name)
            if load is not None and p.type_descriptor.choices is None:  # typer reads choices from a Literal
                p.type_descriptor = replace(p.type_descriptor, annotation=Literal[tuple(load())])
        return params


def _schema() -> dict:
    from kvmas.organizer.spec import PRIMITIVE_PARAMS  # the parameters each primitive accepts (one place)

    return PRIMITIVE_PARAMS


def _comms():
    from kvmas.trace import COMMS

    return COMMS


def _merge_policies():
    return next(p["merge_policy"].choices for p in _schema().values() if "merge_policy" in p)


_CHOICES = {"primitive": lambda: tuple(_schema()), "comm": _comms, "merge_policy": _merge_policies}
# the options that belong to some primitives only: checked against what the chosen primitive accepts
_SPECIFIC = ("rounds", "n", "k", "merge_policy")


def params_for(primitive: str, given: dict) -> dict:
    """The primitive's parameters from the options given (None: its default); an option the primitive does not
    take is a one-line error naming the primitives that do.

    >>> params_for("review", {"rounds": 1, "n": None, "max_new_tokens": 64})
    {'rounds': 1, 'max_new_tokens': 64}
    """
    schema = _schema()
    accepted = schema[primitive]
    out = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in accepted:
            takers = [p for p, params in schema.items() if name in params]
            flag = "--" + name.replace("_", "-")
            raise BadInputError(f"{flag} is for {' | '.join(takers)}, not {primitive}")
        out[name] = value
    return out


def run(
    question: str = typer.Argument(..., help="the question to answer"),
    primitive: str = typer.Option("single", "--primitive", "-p", help="which primitive answers"),
    comm: str = typer.Option("latent", "--comm", "-c", help="how agents hand work on: latent thoughts, KV messages or re-read text"),
    model: str = typer.Option(None, "--model", "-m", help="registry name or local HF dir "
                              "(default: $KVMAS_MODEL or qwen2.5-coder-0.5b, installed on first use)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, max=4096,
                                       help="decode budget per speaking agent"),
    rounds: int = typer.Option(None, "--rounds", min=1, max=8, help="review: critic/refine rounds (default 2)"),
    n: int = typer.Option(None, "--n", min=1, max=16, help="vote: solvers (default 3); consistency: samples (default 5)"),
    k: int = typer.Option(None, "--k", min=1, max=16, help="plan: number of executors (default 3)"),
    merge_policy: str = typer.Option(None, "--merge-policy", help="vote | plan: how parallel branches meet in one context"),
    latent_steps: int = typer.Option(None, "--latent-steps", min=0, max=256,
                                     help="latent steps per agent (default: the primitive's)"),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0, help="0: greedy decoding"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (greedy decoding ignores it)"),
    from_state: Path = typer.Option(None, "--from-state", help="continue from a LatentState saved with "
                                    "--save-state or LatentState.save (same model: its fingerprint is checked; "
                                    "its positions count as reused; a text-mode team refuses it)"),
    save_state: Path = typer.Option(None, "--save-state", help="save the run's final LatentState here"),
    trace: Path = typer.Option(None, "--trace", help="write the run trace (JSON) here"),
    pipeline: Path = typer.Option(None, "--pipeline", help="run a pipeline spec (JSON) instead of one primitive"),
    auto: bool = typer.Option(False, "--auto", help="let the organizer compose a pipeline for this question"),
    show_trace: bool = typer.Option(False, "--show-trace", help="render the trace after the answer"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print the answer alone (no live steps)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: answer, usage, agents, run id"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    backend: str = BACKEND,
    base_url: str = BASE_URL,
) -> None:
    """Answer a question with one primitive (or a pipeline): live steps and speech, then the answer and usage.
    \f
    The answer is printed before the trace is written, so a trace path that cannot be written costs an error
    line and a non-zero exit, never the answer."""
    if not question.strip():
        raise BadInputError("empty question")
    out = make_console()
    live = not (quiet or as_json)
    specific = {"rounds": rounds, "n": n, "k": k, "merge_policy": merge_policy}
    if (pipeline is not None or auto) and (from_state is not None or any(v is not None for v in specific.values())):
        raise BadInputError("--pipeline/--auto take their parameters from the spec (no --from-state, --rounds, "
                            "--n, --k or --merge-policy)")
    status = make_console(stderr=True)
    with status.status("loading model…") if live else nullcontext():
        m = open_backend(backend, model, base_url=base_url, device=device, dtype=dtype)
    def listen(method: str):
        if not live:
            return None
        from kvmas.cli.live import LiveRun

        return LiveRun(out, Text.assemble(("kvmas ", "bold"), (clean(method), "bold cyan"), f" on {clean(m.name)}"))

    if pipeline is not None or auto:
        listener = listen("auto" if auto else str(pipeline))
        result = _run_pipeline(question, m, pipeline, auto, seed, max_new_tokens, listener)
    else:
        from kvmas.primitives import build

        params = params_for(primitive, {**specific, "max_new_tokens": max_new_tokens, "latent_steps": latent_steps,
                                        "temperature": temperature})
        if primitive != "single":
            params["comm"] = comm
        prim = build(primitive, **params)
        state = None
        if from_state is not None:
            from kvmas.agents.state import LatentState

            state = LatentState.load(from_state, m)
        listener = listen(prim.method)
        result = prim(question, model=m, seed=seed, listener=listener, state=state)
    # the answer streamed live is not printed again
    _report(result, out, quiet=quiet, as_json=as_json, trace=trace,
            heard=listener is not None and listener.heard(result.answer))
    if show_trace and not as_json:
        print_trace(result.trace, out)
    if trace is not None:
        result.trace.save(trace)  # an OutputError here reaches the error boundary: one line, exit 1
        if live:
            out.print(Text(f"trace written to {clean(trace)}", style="dim"))
    if save_state is not None and result.state is not None:
        result.state.save(save_state)
        if live:
            out.print(Text(f"state written to {clean(save_state)}", style="dim"))


def _report(result, out, *, quiet: bool, as_json: bool, trace: Path | None, heard: bool = False) -> None:
    t = result.trace
    if as_json:
        agents = {a: sum((s.usage for s in t.steps if s.agent == a), type(t.usage)()).model_dump()
                  for a in t.agents()}
        print_json({"answer": result.answer, "method": t.method, "model": t.model.get("name"),
                          "run_id": t.run_id, "seed": t.seed, "wall_s": round(t.wall_s, 3), "steps": len(t.steps),
                          "usage": t.usage.model_dump(), "agents": agents, "facts": _plain(result.meta),
                          "trace": None if trace is None else str(trace)})
        return
    if quiet:
        out.print(Text(clean(result.answer.strip())), soft_wrap=True)
        return
    if not heard:
        out.print(Text.assemble(("answer:", "bold green"), " ", clean(result.answer.strip())), soft_wrap=True)
    out.print(agent_table(t))
    out.print(Text(f"{clean(t.method)} · {usage_line(result.usage)} · {t.wall_s:.2f}s · run {clean(t.run_id)}",
                   style="dim"))


def _plain(facts: dict) -> dict:
    """The run's facts that JSON can hold (others as their text)."""
    return json.loads(json.dumps(facts, default=str))


def _run_pipeline(question, model, pipeline, auto, seed, max_new_tokens, listener):
    from kvmas import organizer

    if auto:
        return organizer.run_auto(question, model=model, seed=seed, max_new_tokens=max_new_tokens,
                                  listener=listener)
    return organizer.run_pipeline(str(pipeline), question, model=model, seed=seed, listener=listener)
