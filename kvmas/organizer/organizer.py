"""The Organizer: for a query, retrieve candidate pipelines from the knowledge pool and pick one by
constrained choice with the local model; run it; learn from verified outcomes.

Choice, never free text: the candidates are listed as lettered options in one prompt, and the model scores
each option letter as the continuation of "The best design is option (" (``Model.score_continuations``: the
prompt is prefilled once, every letter reuses its KV). Letter bias is removed by contextual calibration
(Zhao et al. 2021): the same prompt with the question replaced by "N/A" is scored too and subtracted. The
final score of option *i* is ``calibrated_logprob_i + prior_weight * log(prior_i)`` where ``prior_i`` is the
entry's pool prior (Laplace success rate times its decay weight), so the pool's experience and the model's
reading of the question both count.

Fallbacks (recorded in the trace step's ``meta.decision``): no candidate (empty pool) -> :data:`DEFAULT_SPEC`
(the single agent); one candidate -> it, unscored; a candidate set the model cannot score (context overflow)
-> the candidate with the best prior. The organizer's own tokens (query embedding, both scoring prompts and
the option letters) are one ``organize`` step of the run's trace, so its cost is in the run's usage.

>>> import os, tempfile
>>> from kvmas.testing import tiny_model
>>> from kvmas.organizer import KnowledgePool, Organizer
>>> from kvmas.organizer import PipelineSpec
>>> pool = KnowledgePool(os.path.join(tempfile.mkdtemp(), "p.sqlite"), seed=False)
>>> for q, prim in [("sums", "single"), ("long sums", "review"), ("options", "vote")]:
...     _ = pool.add(q, PipelineSpec.chain(prim))
>>> d = Organizer(pool, k=3).choose("What is 12 * 7?", tiny_model())
>>> d.how, len(d.options), d.usage.prefilled > 0
('constrained', 3, True)
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from kvmas.errors import BadInputError, ContextOverflowError
from kvmas.organizer.pool import Entry, KnowledgePool, infer_tags
from kvmas.organizer.spec import PipelineSpec
from kvmas.trace import COMMS, Step, Usage

DEFAULT_SPEC = PipelineSpec.chain("single")
LETTERS = "ABCDEFGHIJ"
PROMPT = (
    "You organise a team of AI agents. Choose the team design that will most reliably answer the question "
    "correctly.\n\nQuestion:\n{question}\n\nDesigns:\n{options}\n\n"
    "Reply with the letter of the best design."
)
ANSWER_LEAD = "The best design is option ("
_PRIMITIVE_WORDS = {
    "single": "one agent reasons step by step",
    "review": "a solver drafts, a critic reviews, the solver refines ({rounds} rounds)",
    "vote": "{n} solvers answer independently and a selector reads all answers",
    "plan": "a planner writes a plan and {k} executors carry it out",
    "consistency": "one agent answers {n} times independently and the most common answer is kept",
}
_DEFAULTS = {"review": {"rounds": 2}, "vote": {"n": 3}, "plan": {"k": 3}, "consistency": {"n": 5}}


def describe_in_words(spec: PipelineSpec) -> str:
    """A plain-English description of a pipeline, for the option list the model reads."""
    parts = []
    for nid in spec.order():
        node = next(n for n in spec.nodes if n.id == nid)
        parts.append(_PRIMITIVE_WORDS[node.type].format(**{**_DEFAULTS.get(node.type, {}), **node.params}))
    return "; then ".join(parts)


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@dataclass
class Decision:
    """What the organizer chose and why."""

    spec: PipelineSpec
    entry_id: int | None
    how: str  # constrained | single-candidate | fallback-empty | fallback-prior | random
    options: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    wall_s: float = 0.0
    prompt: str = ""

    def step(self) -> Step:
        """The trace step that accounts for this decision's cost."""
        return Step(agent="organizer", role="organizer", action="organize", text_in=self.prompt or None,
                    text_out=self.spec.describe(), usage=self.usage, wall_s=self.wall_s,
                    meta={"decision": self.how, "entry_id": self.entry_id, "spec": self.spec.model_dump(mode="json"),
                          "options": self.options})


class Organizer:
    """Retrieve ``k`` candidates (cosine + MMR, lexical fallback), choose one by constrained choice, run it.

    ``pool=None`` or an empty pool: always the fallback. ``comm`` is the mode of every node of the chosen
    pipeline that names none (a pipeline learned as ``vote(comm=kv)`` keeps ``kv``; None: the primitive's own
    default); ``node_params`` (budgets) are set on every node. ``random_choice=True`` is the
    random-composition ablation (a seeded uniform pick among the candidates, no model call).
    """

    def __init__(self, pool: KnowledgePool | None = None, *, k: int = 4, diversity: float = 0.3,
                 prior_weight: float = 1.0, calibrate: bool = True, comm: str | None = "latent",
                 node_params: dict[str, Any] | None = None, random_choice: bool = False):
        if not 1 <= k <= len(LETTERS):
            raise BadInputError(f"k must be in 1..{len(LETTERS)}, got {k}")
        if comm is not None and comm not in COMMS:
            raise BadInputError(f"unknown comm mode {comm!r} ({'|'.join(COMMS)})")
        self.pool = pool
        self.k = k
        self.diversity = diversity
        self.prior_weight = prior_weight
        self.calibrate = calibrate
        self.comm = comm
        self.node_params = dict(node_params or {})
        self.random_choice = random_choice

    def _finish(self, spec: PipelineSpec) -> PipelineSpec:
        spec = spec.with_params(**self.node_params) if self.node_params else spec
        return spec.with_defaults(comm=self.comm) if self.comm is not None else spec

    def choose(self, question: str, model, *, seed: int = 0) -> Decision:
        """Pick a pipeline for ``question`` (see the module doc for the rule and the fallbacks)."""
        if not isinstance(question, str) or not question.strip():
            raise BadInputError("empty question")
        if model is None or isinstance(model, str):
            from kvmas.agents.model import Model

            model = Model.load(model)
        t0 = time.perf_counter()
        usage = Usage()
        hits = []
        if self.pool is not None and len(self.pool):
            hits = self.pool.search(question, model=None if self.random_choice else model, k=self.k,
                                    diversity=self.diversity)
            if hits and hits[0].how == "cosine":
                usage = usage + Usage(prefilled=len(model.encode(question)))
        opts = [{"letter": LETTERS[i], "entry_id": h.entry.id, "name": h.entry.name, "spec": h.entry.spec.describe(),
                 "similarity": round(h.similarity, 4), "prior": round(h.entry.prior, 4)} for i, h in enumerate(hits)]
        if not hits:
            return Decision(self._finish(DEFAULT_SPEC), None, "fallback-empty", [], usage,
                            time.perf_counter() - t0)
        if self.random_choice:
            i = random.Random(f"{seed}:{question}").randrange(len(hits))
            return Decision(self._finish(hits[i].entry.spec), hits[i].entry.id, "random", opts, usage,
                            time.perf_counter() - t0)
        if len(hits) == 1:
            return Decision(self._finish(hits[0].entry.spec), hits[0].entry.id, "single-candidate", opts, usage,
                            time.perf_counter() - t0)
        prompt = ""
        try:
            prompt, conts, extra = self._prompt(question, [h.entry for h in hits], model)
            lp = model.score_continuations(prompt, conts)
            usage = usage + extra
            if self.calibrate:
                null_prompt, _, extra0 = self._prompt("N/A", [h.entry for h in hits], model)
                lp0 = model.score_continuations(null_prompt, conts)
                usage = usage + extra0
            else:
                lp0 = [0.0] * len(lp)
        except ContextOverflowError:
            best = max(range(len(hits)), key=lambda i: (hits[i].entry.prior, -i))
            return Decision(self._finish(hits[best].entry.spec), hits[best].entry.id, "fallback-prior", opts,
                            usage, time.perf_counter() - t0, prompt)
        for i, o in enumerate(opts):
            o["logprob"] = round(lp[i], 4)
            o["calibrated"] = round(lp[i] - lp0[i], 4)
            o["score"] = round(lp[i] - lp0[i] + self.prior_weight * math.log(max(hits[i].entry.prior, 1e-9)), 4)
        best = max(range(len(hits)), key=lambda i: (opts[i]["score"], -i))
        opts[best]["chosen"] = True
        return Decision(self._finish(hits[best].entry.spec), hits[best].entry.id, "constrained", opts, usage,
                        time.perf_counter() - t0, prompt)

    @staticmethod
    def _prompt(question: str, entries: list[Entry], model) -> tuple[str, list[str], Usage]:
        lines = [f"({LETTERS[i]}) {describe_in_words(e.spec)}. Suited to: {_clip(e.query)}"
                 for i, e in enumerate(entries)]
        user = PROMPT.format(question=question.strip(), options="\n".join(lines))
        prompt = model.chat_text([{"role": "user", "content": user}]) + ANSWER_LEAD
        conts = [f"{LETTERS[i]})" for i in range(len(entries))]
        n_prompt = len(model.encode(prompt))
        model.check_fits(n_prompt + 4, "organizer prompt")
        n_conts = sum(max(0, len(model.encode(c)) - 1) for c in conts)  # last token of each is never fed
        return prompt, conts, Usage(prefilled=n_prompt + n_conts)

    def run(self, question: str, model=None, *, seed: int = 0, interventions=None, trace_path=None,
            listener=None):
        """Choose a pipeline and run it; the returned trace starts with the organizer's step.

        ``result.meta["organizer"]`` holds the decision (entry id, spec) for :meth:`feedback`.
        """
        from kvmas.organizer.pipeline import Pipeline
        from kvmas.primitives.run import Output, close_run, open_run, resolve_model

        model = resolve_model(model)
        t0 = time.perf_counter()
        decision = self.choose(question, model, seed=seed)
        pipe = Pipeline(decision.spec)
        ctx = open_run(model, question, method="auto", seed=seed, interventions=interventions,
                       params={"pipeline": decision.spec.model_dump(mode="json"), "entry_id": decision.entry_id,
                               "decision": decision.how, "chosen_method": pipe.method},
                       positions=pipe.positions_needed(len(model.encode(question))), prelude=[decision.step()],
                       trace_path=trace_path, started=t0, listener=listener)
        out = pipe.forward(ctx, Output.start(model), final=True)
        return close_run(ctx, out, organizer={"entry_id": decision.entry_id,
                                              "spec": decision.spec.model_dump(mode="json"),
                                              "decision": decision.how, "method": pipe.method})

    def batch(self, questions: list[str], model=None, *, seeds: list[int] | None = None,
              batch_size: int | None = None):
        """:meth:`run` on many questions, their runs as rows of the same forwards (each as if run alone).

        The pool is read, never taught, inside a batch: learn from the results afterwards with :meth:`feedback`.
        """
        from kvmas.primitives.run import batch_runs, check_batch, resolve_model

        seeds = check_batch(questions, seeds)
        model = resolve_model(model)
        return batch_runs(model, [lambda q=q, s=s: self.run(q, model, seed=s) for q, s in zip(questions, seeds)],
                          batch_size)

    def feedback(self, result, success: bool, *, model=None, tags: list[str] | None = None):
        """Teach the pool a verified outcome of a :meth:`run` (its ``RunResult`` or its saved ``Trace``).

        Returns the entry holding the success (None after a failure, or without a pool).
        """
        if self.pool is None:
            return None
        trace = getattr(result, "trace", result)
        params = getattr(trace, "params", None) or {}
        if getattr(trace, "method", None) != "auto" or "pipeline" not in params:
            raise BadInputError("this run was not chosen by the organizer (trace method is not 'auto')")
        spec = PipelineSpec.from_dict(params["pipeline"])
        question = trace.question
        return self.pool.learn(question, spec, success, entry_id=params.get("entry_id"),
                               tokens=trace.usage.computed, time_s=trace.wall_s,
                               tags=tags if tags is not None else infer_tags(question), model=model,
                               run_id=trace.run_id)


def runs_dir():
    """Where ``run_auto`` keeps the traces that ``feedback`` looks up by run id (``kvmas_home()/runs``)."""
    from kvmas.paths import kvmas_home

    d = kvmas_home() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_auto(question: str, model=None, *, seed: int = 0, max_new_tokens: int | None = None,
             latent_steps: int | None = None, pool_path=None, trace_path=None, comm: str = "latent", listener=None):
    """``kvmas run --auto``: organizer over the user's pool; the trace is kept for ``feedback`` by run id.
    ``listener``: as for a primitive (each speech as it is decoded, each step as it is recorded)."""
    params: dict[str, Any] = {}
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    if latent_steps is not None:
        params["latent_steps"] = latent_steps
    org = Organizer(KnowledgePool(pool_path), comm=comm, node_params=params)
    result = org.run(question, model=model, seed=seed, listener=listener)
    result.trace.save(runs_dir() / f"{result.trace.run_id}.json")
    if trace_path:
        result.trace.save(trace_path)
    return result


def feedback(run: str, good: bool, *, pool_path=None, model=None):
    """``kvmas feedback RUN_ID --good/--bad``: teach the pool the verified outcome of an auto run.

    ``run`` is a run id kept by :func:`run_auto` or a path to a trace JSON. Returns the learned entry or None.
    """
    from pathlib import Path

    from kvmas.trace import Trace

    path = Path(run)
    if not path.is_file():
        if not run or not all(c.isalnum() for c in run):
            raise BadInputError(f"not a run id or trace file: {run!r}")
        path = runs_dir() / f"{run}.json"
        if not path.is_file():
            raise BadInputError(f"no auto run with id {run} (looked in {runs_dir()})")
    trace = Trace.load(path)
    return Organizer(KnowledgePool(pool_path)).feedback(trace, good, model=model)
