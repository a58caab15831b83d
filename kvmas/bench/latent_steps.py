"""`kvmas bench latent-steps`: how many latent steps help? Measured by gold-solution likelihood, no decoding.

For each latent primitive and each ``latent_steps`` value, the pipeline runs up to the moment its output agent
would speak; we then score the *gold* worked solution (GSM8K train: calculator marks removed, "#### N"
rewritten as "The final answer is \\boxed{N}.") under that state: mean log-prob per token. Higher means
the latent hand-off puts the answering agent closer to a correct solution. The single agent's score on the
same items is the reference. Cheap (prefills only), so it can cover many items; it is a proxy, reported as
such, beside the decoded accuracy of `kvmas bench efficiency`.
"""

from __future__ import annotations

import re
import time

from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.primitives import parse_method
from kvmas.primitives.run import Output, open_run
from kvmas.tasks import format_question


def gold_solution(task) -> str:
    sol = task.meta.get("solution") or ""
    if not sol:
        raise BadInputError(f"task {task.id} carries no worked solution (use GSM8K train/test JSONL)")
    sol = re.sub(r"<<[^>]*>>", "", sol)
    body, _, final = sol.rpartition("####")
    return f"{body.strip()}\nThe final answer is \\boxed{{{final.strip()}}}."


def answer_state(prim, question: str, model, seed: int = 0):
    """The state right before ``prim``'s output agent decodes (head recomputed after dropping final thoughts)."""

    ctx = open_run(model, question, method=prim.method, params=prim.params(), seed=seed)
    state = prim.forward(ctx, Output.start(model), final=False).state
    last = state.segments[-1]
    if last.kind == "latent":  # non-final output agents leave thoughts for a next primitive: not here
        state = state.crop(last.start)
    tail = state.segments[-1]
    return state.crop(state.length - 1).extend([tail.token_ids[0][-1]], agent=tail.agent, role=tail.role)


def run(model, tasks, methods=("latent:review", "latent:vote", "latent:plan"), steps=(0, 2, 4, 8, 16),
        progress=None, handoffs=("thoughts",)) -> dict:
    out: dict = {"single": {"scores": [], "s": 0.0}}
    for task in tasks:
        q = format_question(task)
        gold = gold_solution(task)
        t0 = time.perf_counter()
        single = LatentState.empty(model).extend(model.chat_text([{"role": "user", "content": q}]))
        out["single"]["scores"].append(single.score([gold], mean=True)[0])
        out["single"]["s"] += time.perf_counter() - t0
        for method in methods:
            for m in steps:
                for h in handoffs:
                    key = f"{method}@{m}" + (f"/{h}" if len(handoffs) > 1 else "")
                    t0 = time.perf_counter()
                    st = answer_state(parse_method(method, latent_steps=m, handoff=h), q, model)
                    row = out.setdefault(key, {"scores": [], "s": 0.0})
                    row["scores"].append(st.score([gold], mean=True)[0])
                    row["s"] += time.perf_counter() - t0
        if progress:
            progress()
    for row in out.values():
        row["mean"] = sum(row["scores"]) / len(row["scores"])
    return out
