"""`kvmas bench efficiency`: tokens, latent steps, wall time, peak memory and accuracy per method.

Every method runs through the evaluation harness (:mod:`kvmas.bench.harness`) on the same questions, model,
seed and budgets, each method in its own worker process (so its peak RSS is its own). Speed is reported as
ratios measured in this one run, always beside accuracy, answer lengths, echoed role prompts and sample
answers, so that a speed-up bought with broken answers cannot hide. The report adds the error of Vote's merge
policies against exact re-prefill, measured on the state Vote itself builds.

    kvmas bench efficiency --n 20                                  # seeded synthetic tasks, embedded model
    kvmas bench efficiency --data ../shared/data/gsm8k/test_dev.jsonl --n 20 --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kvmas.agents.model import Model
from kvmas.bench.harness import BenchConfig, parse_methods, run_bench
from kvmas.errors import BadInputError
from kvmas.primitives import Vote
from kvmas.primitives.run import Output, open_run

DEFAULT_METHODS = ["single", "latent:review", "text:review", "latent:vote", "text:vote", "latent:plan", "text:plan"]


def merge_policy_error(model, question: str, n: int = 3, latent_steps: int = 4) -> dict:
    """Error of the Vote selector's merge policies against exact re-prefill of all candidates.

    Builds the latent Vote state up to the selector's prompt with Vote's own code (``Vote.selector_state``,
    hand-offs included) under each policy and compares the selector's next-token distribution with the
    ``reprefill`` (exact joint) one: max |Δ logprob|, KL and top-1 agreement.
    """
    import torch

    vote = Vote(n=n, latent_steps=latent_steps)

    def selector_logprobs(policy: str):
        ctx = open_run(model, question, method=vote.method, params=vote.params())
        return vote.selector_state(ctx, Output.start(model), policy).next_logprobs()[0]

    ref = selector_logprobs("reprefill")
    out = {}
    for policy in ("shared", "rerotate"):
        lp = selector_logprobs(policy)
        out[policy] = {
            "max_abs_dlogprob": float((lp - ref).abs().max()),
            "kl_exact_to_policy": float(torch.sum(ref.exp() * (ref - lp))),
            "top1_agrees": bool(int(lp.argmax()) == int(ref.argmax())),
        }
    return out


def ratios(summary: dict[str, Any]) -> dict[str, float]:
    """Wall-time ratios against the single agent, and text/latent ratios of each primitive (wall, generated)."""
    rows = summary["methods"]
    out = {}
    if "single" in rows:
        for m, row in rows.items():
            out[f"{m} / single (wall)"] = row["wall_s_total"] / max(1e-9, rows["single"]["wall_s_total"])
    for prim in ("review", "vote", "plan"):
        lat, txt = rows.get(f"latent:{prim}"), rows.get(f"text:{prim}")
        if lat and txt:
            out[f"text/latent {prim} (wall)"] = txt["wall_s_total"] / max(1e-9, lat["wall_s_total"])
            out[f"text/latent {prim} (generated)"] = (txt["tokens_total"]["generated"]
                                                      / max(1, lat["tokens_total"]["generated"]))
    return out


def run_efficiency(*, tasks, methods: list[str], model, seed: int, max_new_tokens: int, latent_steps: int | None,
                   out_dir: Path, data_name: str = "", merge_error: int = 3,
                   progress: Callable[[str, int, int], None] | None = None, batch_size: int | None = 1,
                   device: str | None = None, dtype: str = "auto") -> dict:
    """Run every method in its own worker process; write results.json, results.md, chart.png and traces/.

    ``model``: a registry name or model dir (the workers load it), or None for the default.
    """

    meths = parse_methods(",".join(methods))  # unknown methods fail before any work
    if not tasks:
        raise BadInputError("no tasks to run")
    loaded = Model.load(model, device=device, dtype=dtype)
    cfg = BenchConfig(seed=seed, max_new_tokens=max_new_tokens, latent_steps=latent_steps, isolate=True,
                      trace_dir=str(Path(out_dir) / "traces"), batch_size=batch_size, device=device, dtype=dtype)

    def extra(summary: dict[str, Any]) -> dict[str, Any]:
        section: dict[str, Any] = {"ratios": ratios(summary)}
        if merge_error and "latent:vote" in summary["methods"]:
            section["merge_error"] = [merge_policy_error(loaded, t.question, latent_steps=latent_steps or 4)
                                      for t in tasks[:merge_error]]
        return section

    return run_bench(tasks, meths, model if model is not None else loaded, out_dir, cfg, data_name=data_name,
                     progress=progress, extra=extra)
