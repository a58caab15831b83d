"""The run lifecycle every entry point shares: ``open_run`` → ``forward`` → ``close_run``.

A primitive's ``forward(ctx, inp, final)`` takes and returns an :class:`Output` (state, text messages, answer,
facts); the :class:`~kvmas.agents.agent.RunContext` holds the run's inputs and its trace only. Primitives,
pipelines, the organizer and the benches open and close runs here, so a run is set up in one place.

>>> from kvmas.testing import tiny_model
>>> from kvmas.primitives import Single
>>> from kvmas.primitives.run import Output, close_run, open_run
>>> m = tiny_model()
>>> prim = Single(max_new_tokens=3)
>>> ctx = open_run(m, "2+2?", method=prim.method, params=prim.params())
>>> result = close_run(ctx, prim.forward(ctx, Output.start(m)))
>>> result.trace.method, len(result.trace.steps)
('single', 2)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kvmas.agents.agent import Intervention, RunContext, SkillSource
from kvmas.agents.engine import run_batched
from kvmas.agents.model import Model
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.trace import Step, Trace, Usage

TEAM_SYSTEM = "You are a helpful assistant working in a team of agents on one problem."
log = logging.getLogger(__name__)
Message = tuple[str, str]  # (who, text): a decoded message a text-mode agent re-reads


def merge_facts(*facts: Mapping[str, Any]) -> dict[str, Any]:
    """Facts of several primitives in run order: lists extend, a later value wins, None never overwrites."""
    out: dict[str, Any] = {}
    for f in facts:
        for k, v in f.items():
            if isinstance(v, list) and isinstance(out.get(k), list):
                out[k] = out[k] + v
            elif v is not None or k not in out:
                out[k] = v
    return out


@dataclass(frozen=True)
class Output:
    """What a primitive's ``forward`` returns and the next primitive reads.

    ``state``: the latent state (the KV hand-off; in text mode whatever the last agent left).
    ``messages``: decoded messages so far, for text-mode readers. ``answer``: the latest answer spoken.
    ``facts``: what the primitives report about the run (early stops, majority votes, ...).
    """

    state: LatentState
    messages: tuple[Message, ...] = ()
    answer: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, model) -> "Output":
        """The input of a run's first primitive: an empty state and no messages."""
        return cls(LatentState.empty(model))

    @classmethod
    def resume(cls, ctx: RunContext, state: LatentState) -> "Output":
        """The input of a run that continues a saved state: the question read on top of it, as a user turn.

        The state must come from this run's model (same fingerprint); its segments keep their provenance.
        Its positions are not computed again: the resume step counts them as reused (once; see
        :meth:`RunContext.adopt`).
        """
        ctx.model.fingerprint.check(state.model.fingerprint, "the saved state")
        if not state.length:
            return cls(state)
        full = ctx.model.chat_text([{"role": "system", "content": ctx.system},
                                    {"role": "user", "content": f"Problem:\n{ctx.question}"}],
                                   add_generation_prompt=False)
        head = ctx.model.chat_text([{"role": "system", "content": ctx.system}], add_generation_prompt=False)
        text = full[len(head):] if full.startswith(head) else full
        t0 = time.perf_counter()
        reused = ctx.adopt(state)
        after = state.extend(text, agent="user", role="question")
        ctx.trace.add(Step(agent="user", role="question", action="read", reads=state.segment_ids(),
                           writes=[after.segments[-1].id], text_in=text,
                           usage=Usage(prefilled=after.length - state.length, reused=reused),
                           wall_s=time.perf_counter() - t0,
                           meta={"resumed_from": state.length, "message": f"Problem:\n{ctx.question}"}))
        return cls(after)

    def then(self, state: LatentState, *, answer: str | None = None, message: Message | None = None,
             **facts: Any) -> "Output":
        """This output continued: a new state, optionally a spoken answer, a message and new facts."""
        return Output(state=state, messages=self.messages + ((message,) if message else ()),
                      answer=self.answer if answer is None else answer,
                      facts=merge_facts(self.facts, facts) if facts else self.facts)


@dataclass
class RunResult:
    """What a run returns: the final text, the trace, total usage, the final state and the run's facts."""

    answer: str
    trace: Trace
    state: LatentState | None = None
    meta: dict = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return self.trace.usage

    def __repr__(self) -> str:
        answer = self.answer if len(self.answer) <= 60 else self.answer[:59] + "…"
        u = self.usage
        return (f"RunResult(answer={answer!r}, method={self.trace.method!r}, steps={len(self.trace.steps)}, "
                f"computed={u.computed}, reused={u.reused}, wall_s={self.trace.wall_s:.2f})")


def resolve_model(model) -> Model:
    """A :class:`Model` from a Model, a registry name or path, or None (the default model)."""
    return Model.load(model) if model is None or isinstance(model, str) else model


def open_run(model, question: str, *, method: str, params: dict | None = None, seed: int = 0,
             interventions: dict[str, Intervention | list[Intervention]] | None = None,
             skills: SkillSource | None = None, positions: int | None = None, prelude: list[Step] = (),
             trace_path: str | Path | None = None, system: str = TEAM_SYSTEM,
             started: float | None = None, listener=None) -> RunContext:
    """Validate the question, check the context fits ``positions``, start the trace (``prelude`` steps first).

    ``started`` (a ``time.perf_counter()`` value) counts work done before opening, such as the organizer's
    decision, in the run's wall time. ``listener(agent, text_delta, final)`` hears every speech as it is
    decoded (see :class:`~kvmas.agents.agent.RunContext`); a listener with an ``on_step(step)`` method hears
    every step as it is recorded, too.
    """
    if not isinstance(question, str) or not question.strip():
        raise BadInputError("empty question")
    model = resolve_model(model)
    if positions is not None:
        model.check_fits(positions, f"{method} on this question")
    trace = Trace(method=method, question=question, seed=seed, model=model.fingerprint.model_dump(),
                  params=dict(params or {}))
    if getattr(listener, "on_step", None) is not None:  # a listener may hear every recorded step too
        trace.watch(listener.on_step)
    for step in prelude:
        trace.add(step)
    log.debug("run %s: %s on %s, seed %d", trace.run_id, method, model.name, seed)
    return RunContext(model=model, question=question, seed=seed, trace=trace, system=system,
                      interventions=interventions or {}, skills=skills,
                      started=time.perf_counter() if started is None else started, trace_path=trace_path,
                      listener=listener)


def close_run(ctx: RunContext, out: Output, **extra_facts: Any) -> RunResult:
    """Finish the trace (wall time, answer), write it if asked, and return the run's result."""
    ctx.trace.wall_s = time.perf_counter() - ctx.started
    ctx.trace.answer = out.answer
    log.debug("run %s done: %d steps, %d positions computed, %.2f s", ctx.trace.run_id, len(ctx.trace.steps),
              ctx.trace.usage.computed, ctx.trace.wall_s)
    if ctx.trace_path:
        ctx.trace.save(ctx.trace_path)
    return RunResult(answer=out.answer or "", trace=ctx.trace, state=out.state,
                     meta={**dict(out.facts), **extra_facts})


def check_batch(questions, seeds) -> list[int]:
    """A batch's questions (each a non-empty string) and seeds (default 0 each); BadInputError naming the index."""
    if isinstance(questions, str) or not isinstance(questions, (list, tuple)):
        raise BadInputError("batch takes a list of questions")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise BadInputError(f"question {i} of the batch is empty")
    seeds = [0] * len(questions) if seeds is None else list(seeds)
    if len(seeds) != len(questions):
        raise BadInputError(f"{len(seeds)} seeds for {len(questions)} questions")
    return seeds


def batch_runs(model: Model, runs, batch_size: int | None = None) -> list[RunResult]:
    """Whole runs (callables) executed ``batch_size`` at a time as rows of shared forwards."""
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise BadInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    return run_batched(model, runs, batch_size)
