"""Primitive: a composable ``state -> state`` step with a latent and a text mode, and its run record.

A primitive's ``forward(ctx, state, final)`` reads the shared context (latent) or the text messages so far
(text), lets its agents work, and returns the state. When ``final`` its output agent speaks the answer;
otherwise, in latent mode, it leaves latent thoughts for the next primitive (text mode always speaks).

>>> from kvmas.testing import tiny_model
>>> from kvmas.primitives import Single
>>> r = Single(max_new_tokens=4)("What is 2+3?", model=tiny_model())
>>> r.trace.method, len(r.trace.steps)
('single', 2)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kvmas.agents.agent import Intervention, RunContext
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.trace import Trace, Usage

Comm = Literal["latent", "text"]
TEAM_SYSTEM = "You are a helpful assistant working in a team of agents on one problem."
HANDOFFS = ("thoughts", "full")
LIMITS = {"rounds": (1, 8), "n": (1, 16), "k": (1, 16), "latent_steps": (0, 256), "max_new_tokens": (1, 4096)}


def check_param(name: str, value: int) -> int:
    lo, hi = LIMITS[name]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadInputError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


@dataclass
class RunResult:
    """What a primitive call returns: the final text, the trace, total usage and the final state."""

    answer: str
    trace: Trace
    state: LatentState | None = None
    meta: dict = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return self.trace.usage


class Primitive:
    """Base class. Subclasses set ``name`` and implement ``forward``; compose with :class:`Sequence`."""

    name = "primitive"

    def __init__(self, comm: Comm = "latent", latent_steps: int = 4, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, handoff: str = "thoughts"):
        if comm not in ("latent", "text"):
            raise BadInputError(f"unknown comm mode {comm!r} (latent|text)")
        if handoff not in HANDOFFS:
            raise BadInputError(f"unknown handoff {handoff!r} (one of {', '.join(HANDOFFS)})")
        self.handoff_mode = handoff
        self.comm = comm
        self.latent_steps = check_param("latent_steps", latent_steps)
        self.max_new_tokens = check_param("max_new_tokens", max_new_tokens)
        self.temperature = temperature
        self.top_p = top_p

    # -- to override ---------------------------------------------------------------------------------
    def forward(self, ctx: RunContext, state: LatentState, final: bool = True) -> LatentState:
        raise NotImplementedError

    def positions_needed(self, question_tokens: int) -> int:
        """Upper bound of context positions one run needs (checked before running)."""
        return question_tokens + 256 + self.latent_steps + self.max_new_tokens

    def params(self) -> dict:
        return {"comm": self.comm, "latent_steps": self.latent_steps, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "handoff": self.handoff_mode}

    @property
    def method(self) -> str:
        return self.name if self.name == "single" else f"{self.comm}:{self.name}"

    # -- running ---------------------------------------------------------------------------------------
    def __call__(self, question: str, model=None, *, seed: int = 0,
                 interventions: dict[str, Intervention] | None = None, trace_path: str | Path | None = None,
                 skills=None) -> RunResult:
        """Run on one question. ``model``: a Model, a registry name/path, or None for the default."""
        from kvmas.agents.model import Model

        if not isinstance(question, str) or not question.strip():
            raise BadInputError("empty question")
        if model is None or isinstance(model, str):
            model = Model.load(model)
        model.check_fits(self.positions_needed(len(model.encode(question))), f"{self.method} on this question")
        trace = Trace(method=self.method, question=question, seed=seed,
                      model=model.fingerprint.model_dump(), params=self.params())
        ctx = RunContext(model=model, question=question, seed=seed, trace=trace, system=TEAM_SYSTEM,
                         interventions=interventions or {}, skills=skills)
        t0 = time.perf_counter()
        state = self.forward(ctx, LatentState.empty(model), final=True)
        trace.wall_s = time.perf_counter() - t0
        trace.answer = ctx.answer
        if trace_path:
            trace.save(trace_path)
        return RunResult(answer=ctx.answer or "", trace=trace, state=state, meta=dict(ctx.meta))

    # -- helpers shared by the primitives ----------------------------------------------------------------
    def problem_text(self, ctx: RunContext) -> str:
        """The problem as every agent sees it (the original query is always in context)."""
        return f"Problem:\n{ctx.question}"

    def final_instruction(self, ctx: RunContext, instruction: str) -> str:
        """The output agent's instruction, with the problem restated right before it answers (both modes)."""
        return f"{instruction}\n\nProblem:\n{ctx.question}"

    def text_context(self, ctx: RunContext, messages: list[tuple[str, str]]) -> str:
        """Problem + decoded messages so far, for a text-mode agent's fresh prompt."""
        parts = [self.problem_text(ctx)]
        parts += [f"{who}:\n{text.strip()}" for who, text in ctx.messages + messages]
        return "\n\n".join(parts)

    def handoff(self, state: LatentState) -> LatentState:
        """Latent mode, before another agent reads: keep the earlier agents' thoughts, drop their instructions.

        With ``handoff="thoughts"`` (default) the role prompt of every agent that has thought on top of it is
        dropped (masked out; its thoughts keep what they absorbed from it). Measured on smollm2: when the role
        prompts stay, the speaking agent copies the last one ("You are the Critic. ...") instead of answering.
        The question prefix is never dropped; ``handoff="full"`` keeps everything.
        """
        if self.handoff_mode == "full":
            return state
        thinkers = {s.agent for s in state.segments if s.kind != "prompt"}
        for seg in list(state.segments):
            if seg.kind == "prompt" and seg.agent != "user" and seg.agent in thinkers \
                    and seg.id in state.segment_ids():
                state = state.drop(seg.id)
        return state

    def shared_prefix(self, ctx: RunContext, state: LatentState) -> LatentState:
        """Latent mode: the problem prefilled once as the start of the shared conversation."""
        if state.length:
            return state
        text = ctx.model.chat_text([{"role": "system", "content": ctx.system},
                                    {"role": "user", "content": self.text_context(ctx, [])}],
                                   add_generation_prompt=False)
        t0 = time.perf_counter()
        after = state.extend(text, agent="user", role="question")
        from kvmas.trace import Step

        ctx.trace.add(Step(agent="user", role="question", action="read", writes=after.segment_ids(),
                           text_in=text, usage=Usage(prefilled=after.length), wall_s=time.perf_counter() - t0))
        return after


class Sequence(Primitive):
    """Primitives run one after another on the same state (latent) or message list (text).

    >>> from kvmas.primitives import Sequence, PlanExecute, Review
    >>> Sequence(PlanExecute(), Review()).method
    'latent:plan>latent:review'
    """

    name = "sequence"

    def __init__(self, *steps: Primitive):
        if not steps:
            raise BadInputError("Sequence needs at least one primitive")
        comms = {s.comm for s in steps}
        super().__init__(comm=steps[-1].comm, latent_steps=max(s.latent_steps for s in steps),
                         max_new_tokens=max(s.max_new_tokens for s in steps))
        self.steps = list(steps)
        self.mixed = len(comms) > 1

    @property
    def method(self) -> str:
        return ">".join(s.method for s in self.steps)

    def params(self) -> dict:
        return {"steps": [{"type": s.name, **s.params()} for s in self.steps]}

    def positions_needed(self, question_tokens: int) -> int:
        return question_tokens + sum(s.positions_needed(0) for s in self.steps)

    def forward(self, ctx: RunContext, state: LatentState, final: bool = True) -> LatentState:
        for i, step in enumerate(self.steps):
            last = final and i == len(self.steps) - 1
            if step.comm == "text" and state.length:
                state = LatentState.empty(ctx.model)  # text mode re-reads messages, never KV
            state = step.forward(ctx, state, final=last)
        return state
