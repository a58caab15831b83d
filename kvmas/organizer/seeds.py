"""The designs a new knowledge pool starts with: classic multi-agent patterns, re-expressed as primitive pipelines.

Each entry is our own short description of when the design helps (the text retrieval matches a query
against), tags, and the pipeline that plays its role with kvmas primitives. References are to the published
designs these are modelled on; no text is taken from them.

>>> from kvmas.organizer.seeds import seed_entries
>>> names = [e["name"] for e in seed_entries()]
>>> "self-consistency" in names and "self-refine" in names
True
"""

from __future__ import annotations

from typing import Any

from kvmas.organizer.spec import PipelineSpec

_CHAIN = PipelineSpec.chain

SEED_DESIGNS: list[dict[str, Any]] = [
    dict(name="chain-of-thought",
         ref="Wei et al. 2022, chain-of-thought prompting",
         query="A short, direct question one careful solver can answer by reasoning step by step: a single "
               "calculation, a fact, a definition.",
         tags=["short", "simple", "fact"], spec=_CHAIN("single")),
    dict(name="self-refine",
         ref="Madaan et al. 2023, Self-Refine",
         query="A multi-step word problem where a first draft often contains a small slip that a critic can "
               "point out and the solver can fix: bookkeeping of quantities, money, rates, unit conversions.",
         tags=["math", "multi-step", "refine"], spec=_CHAIN(("review", {"rounds": 2}))),
    dict(name="reflexion",
         ref="Shinn et al. 2023, Reflexion",
         query="A tricky problem where the solver should reflect on its own mistakes several times before "
               "committing: long calculations, problems with traps or misleading wording.",
         tags=["math", "hard", "refine"], spec=_CHAIN(("review", {"rounds": 3}))),
    dict(name="self-consistency",
         ref="Wang et al. 2022, self-consistency",
         query="A question with one short final answer, a number or an option letter, where several "
               "independent reasoning paths can be compared and the most common answer kept.",
         tags=["math", "choice", "short-answer", "ensemble"],
         spec=_CHAIN(("vote", {"n": 5, "aggregate": "majority"}))),
    dict(name="best-of-three",
         ref="best-of-n selection with a reader",
         query="A question where three independent attempts followed by a careful selector reading all of them "
               "is a cheap way to avoid one unlucky reasoning path.",
         tags=["math", "choice", "ensemble"], spec=_CHAIN(("vote", {"n": 3}))),
    dict(name="multi-agent-debate",
         ref="Du et al. 2023, multi-agent debate",
         query="A question on which solvers may disagree: several agents propose answers, then the answers "
               "are criticised and a revised answer is given.",
         tags=["math", "choice", "debate"], spec=_CHAIN(("vote", {"n": 3}), ("review", {"rounds": 1}))),
    dict(name="plan-and-solve",
         ref="Wang et al. 2023, Plan-and-Solve prompting",
         query="A word problem with several quantities and steps that benefits from first writing a plan of "
               "the steps and then carrying the plan out.",
         tags=["math", "multi-step", "plan"], spec=_CHAIN(("plan", {"k": 1}))),
    dict(name="least-to-most",
         ref="Zhou et al. 2023, least-to-most prompting",
         query="A problem that decomposes into smaller sub-questions solved one after another, each answer "
               "feeding the next, such as multi-stage rate or age problems.",
         tags=["math", "multi-step", "decompose"], spec=_CHAIN(("plan", {"k": 3}))),
    dict(name="plan-then-verify",
         ref="MAS-GPT style generated system: planner, executors, verifier",
         query="A complex problem where a plan is executed by several workers and the combined result is "
               "checked by a critic before answering.",
         tags=["math", "hard", "plan", "refine"], spec=_CHAIN(("plan", {"k": 3}), ("review", {"rounds": 1}))),
    dict(name="mixture-of-agents",
         ref="Wang et al. 2024, mixture-of-agents",
         query="A hard question where a plan guides several proposers whose answers are aggregated by a "
               "selector that reads all of them.",
         tags=["hard", "ensemble", "plan"], spec=_CHAIN(("plan", {"k": 3}), ("vote", {"n": 3}))),
    dict(name="dylan-team",
         ref="Liu et al. 2023, DyLAN dynamic agent network",
         query="A question answered by a team: four agents respond in parallel, the best responses are kept "
               "and a reviewer polishes the final answer.",
         tags=["choice", "ensemble", "refine"], spec=_CHAIN(("vote", {"n": 4}), ("review", {"rounds": 1}))),
    dict(name="science-choice-vote",
         ref="option elimination by independent voters",
         query="A multiple-choice science or commonsense question: compare the options, eliminate the wrong "
               "ones, and choose the letter most solvers support.",
         tags=["choice", "science", "ensemble"], spec=_CHAIN(("vote", {"n": 3}))),
    dict(name="branch-and-merge",
         ref="AFlow-style workflow with parallel branches and a merge",
         query="A difficult multi-step problem where, after a plan, a critic-refined solution and a voted "
               "solution are produced independently and a final solver combines both.",
         tags=["math", "hard", "plan", "ensemble"],
         spec=PipelineSpec.from_dict({
             "nodes": [{"id": "plan", "type": "plan", "params": {"k": 2}},
                       {"id": "refine", "type": "review", "params": {"rounds": 1}},
                       {"id": "vote", "type": "vote", "params": {"n": 3}},
                       {"id": "final", "type": "single", "merge": "shared"}],
             "edges": [["plan", "refine"], ["plan", "vote"], ["refine", "final"], ["vote", "final"]]})),
]


def seed_entries() -> list[dict[str, Any]]:
    """Fresh copies of :data:`SEED_DESIGNS` (name, ref, query, tags, spec)."""
    return [dict(d, tags=list(d["tags"])) for d in SEED_DESIGNS]
