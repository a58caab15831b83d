"""Primitive: a composable step with a latent and a text mode, run through one lifecycle.

A primitive's ``forward(ctx, inp, final)`` reads its input :class:`~kvmas.primitives.run.Output` (the shared
latent state, and the decoded messages for text mode), lets its agents work, and returns a new ``Output``.
When ``final`` its output agent speaks the answer; otherwise, in latent mode, it leaves latent thoughts for
the next primitive (text mode always speaks). Calling a primitive opens a run, forwards and closes it.

>>> from kvmas.testing import tiny_model
>>> from kvmas.primitives import Single
>>> r = Single(max_new_tokens=4)("What is 2+3?", model=tiny_model())
>>> r.trace.method, len(r.trace.steps)
('single', 2)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from kvmas.agents.agent import Agent, Intervention, RunContext
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.primitives.run import (
    TEAM_SYSTEM, Message, Output, RunResult, batch_runs, check_batch, close_run, open_run, resolve_model,
)
from kvmas.trace import COMMS, Step, Usage

Comm = Literal["latent", "text", "kv"]
HANDOFFS = ("thoughts", "full")
LIMITS = {"rounds": (1, 8), "n": (1, 16), "k": (1, 16), "latent_steps": (0, 256), "max_new_tokens": (1, 4096)}
__all__ = ["COMMS", "Primitive", "Sequence", "RunResult", "Output", "TEAM_SYSTEM", "check_param"]


def check_param(name: str, value: int) -> int:
    lo, hi = LIMITS[name]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadInputError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def chained_kv_positions(question_tokens: int, steps) -> int:
    """The largest ``kv_positions`` of steps run in this order, each reading at most the question and every
    earlier step's positions (a Sequence's steps, a pipeline's nodes in topological order)."""
    before, peak = question_tokens, 0
    for step in steps:
        peak, before = max(peak, step.kv_positions(before)), before + step.positions_needed(0)
    return peak


class Primitive:
    """Base class. Subclasses set ``name`` and implement ``forward``; compose with :class:`Sequence`."""

    name = "primitive"

    def __init__(self, comm: Comm = "latent", latent_steps: int = 4, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_p: float = 1.0, handoff: str = "thoughts"):
        if comm not in COMMS:
            raise BadInputError(f"unknown comm mode {comm!r} ({'|'.join(COMMS)})")
        if handoff not in HANDOFFS:
            raise BadInputError(f"unknown handoff {handoff!r} (one of {', '.join(HANDOFFS)})")
        self.handoff_mode = handoff
        self.comm = comm
        self.latent_steps = check_param("latent_steps", latent_steps)
        self.max_new_tokens = check_param("max_new_tokens", max_new_tokens)
        self.temperature = temperature
        self.top_p = top_p

    # -- to override ---------------------------------------------------------------------------------
    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        raise NotImplementedError

    def positions_needed(self, question_tokens: int) -> int:
        """Upper bound of context positions one run needs (checked before running)."""
        return question_tokens + 256 + self.latent_steps + self.max_new_tokens

    def kv_positions(self, question_tokens: int) -> int:
        """Upper bound of the KV positions one run holds at once, summed over its rows (sizes the default
        batch): one row of ``positions_needed`` unless the primitive forks rows."""
        return self.positions_needed(question_tokens)

    def turn_positions(self) -> int:
        """Upper bound of the positions one agent's turn adds: its instruction, then its thoughts (latent) or
        its decoded message."""
        return 64 + (self.latent_steps if self.comm == "latent" else self.max_new_tokens)

    def continues_state(self) -> bool:
        """Whether ``forward`` reads on top of its input state, so that a run can continue a saved one:
        latent and kv hand-offs do; a text-mode team re-reads decoded messages from a fresh cache."""
        return self.comm != "text"

    def params(self) -> dict:
        return {"comm": self.comm, "latent_steps": self.latent_steps, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "handoff": self.handoff_mode}

    @property
    def method(self) -> str:
        return self.name if self.name == "single" else f"{self.comm}:{self.name}"

    # -- running ---------------------------------------------------------------------------------------
    def __call__(self, question: str, model=None, *, seed: int = 0,
                 interventions: dict[str, Intervention] | None = None, trace_path: str | Path | None = None,
                 skills=None, listener=None, state: LatentState | None = None) -> RunResult:
        """Run on one question. ``model``: a Model, a registry name/path, or None for the default.

        ``listener(agent, text_delta, final)`` hears every speech as it is decoded; ``final`` marks the answer.
        ``state``: continue from a saved :class:`LatentState` (``LatentState.load(path, model)``, same model:
        the fingerprint is checked) instead of an empty one; the question is read on top of it, and the
        state's positions count as reused (once). A text-mode team, which re-reads decoded messages from a
        fresh cache, refuses a state rather than ignore it (``continues_state``).
        """
        if not isinstance(question, str) or not question.strip():
            raise BadInputError("empty question")
        if state is not None and not self.continues_state():
            raise BadInputError(f"{self.method} re-reads decoded text from a fresh cache and would ignore the "
                                "saved state: continue it with comm='latent' or 'kv'")
        model = resolve_model(model)
        ctx = open_run(model, question, method=self.method, params=self.params(), seed=seed,
                       interventions=interventions, skills=skills, trace_path=trace_path, listener=listener,
                       positions=self.positions_needed(len(model.encode(question))) + (state.length if state else 0))
        start = Output.start(model) if state is None else Output.resume(ctx, state)
        return close_run(ctx, self.forward(ctx, start, final=True))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({shown})"

    def batch(self, questions: list[str], model=None, *, seeds: list[int] | None = None,
              batch_size: int | None = None, interventions: dict[str, Intervention] | None = None,
              skills=None) -> list[RunResult]:
        """Run on many questions at once: ``batch_size`` runs (default all) as rows of the same forwards.

        Each result equals the one ``prim(question, seed=seed)`` gives alone (its own trace and usage). Every
        question is checked (empty, too long for the context) before anything runs.

        >>> from kvmas.testing import tiny_model
        >>> from kvmas.primitives import Single
        >>> m, prim = tiny_model(), Single(max_new_tokens=3)
        >>> [r.answer for r in prim.batch(["2+2?", "What is 10 - 7?"], model=m)] == \\
        ...     [prim("2+2?", model=m).answer, prim("What is 10 - 7?", model=m).answer]
        True
        """
        seeds = check_batch(questions, seeds)
        model = resolve_model(model)
        for i, q in enumerate(questions):
            model.check_fits(self.positions_needed(len(model.encode(q))), f"{self.method} on question {i} of the batch")
        return batch_runs(model, [lambda q=q, s=s: self(q, model, seed=s, interventions=interventions, skills=skills)
                                  for q, s in zip(questions, seeds)], batch_size)

    # -- helpers shared by the primitives ----------------------------------------------------------------
    def problem_text(self, ctx: RunContext) -> str:
        """The problem as every agent sees it (the original query is always in context)."""
        return f"Problem:\n{ctx.question}"

    def final_instruction(self, ctx: RunContext, instruction: str) -> str:
        """The output agent's instruction, with the problem restated right before it answers (both modes)."""
        return f"{instruction}\n\nProblem:\n{ctx.question}"

    def text_context(self, ctx: RunContext, inp: Output, messages: list[Message] = ()) -> str:
        """Problem + decoded messages so far (the input's, then ``messages``), for a text-mode fresh prompt."""
        parts = [self.problem_text(ctx)]
        parts += [f"{who}:\n{text.strip()}" for who, text in [*inp.messages, *messages]]
        return "\n\n".join(parts)

    def handoff(self, state: LatentState) -> LatentState:
        """Latent mode, before another agent reads: keep the earlier agents' thoughts, drop their instructions.

        With ``handoff="thoughts"`` (default) the role prompt of every agent that has thought on top of it is
        dropped (masked out; its thoughts keep what they absorbed from it). Measured on smollm2: when the role
        prompts stay, the speaking agent copies the last one ("You are the Critic. ...") instead of answering.
        The question prefix is never dropped; ``handoff="full"`` keeps everything.
        """
        if self.handoff_mode == "full" or self.comm == "kv":  # kv: the cache is the transcript, kept whole
            return state
        thinkers = {s.agent for s in state.segments if s.kind != "prompt"}
        for seg in list(state.segments):
            if seg.kind == "prompt" and seg.agent != "user" and seg.agent in thinkers \
                    and seg.id in state.segment_ids():
                state = state.drop(seg.id)
        return state

    def shared_prefix(self, ctx: RunContext, inp: Output) -> LatentState:
        """Latent mode: the input state, or when it is empty the problem (and any messages so far) prefilled
        once as the start of the shared conversation, already handed off."""
        state = inp.state
        if state.length:
            return self.handoff(state)
        return self._prefill_question(ctx, state, self.text_context(ctx, inp), open_turn=False)

    def asked(self, ctx: RunContext, inp: Output) -> LatentState | None:
        """The question as a user asks it, with the answer's turn open: the single agent's prompt, token for
        token, prefilled as the shared question (so no hand-off drops it). None when the input already holds
        a conversation (state or messages): then there is no fresh question to answer as single does."""
        if inp.state.length or inp.messages:
            return None
        return self._prefill_question(ctx, inp.state, ctx.question, open_turn=True)

    def _prefill_question(self, ctx: RunContext, state: LatentState, content: str, open_turn: bool) -> LatentState:
        text = ctx.model.chat_text([{"role": "system", "content": ctx.system}, {"role": "user", "content": content}],
                                   add_generation_prompt=open_turn)
        t0 = time.perf_counter()
        after = state.extend(text, agent="user", role="question")
        ctx.trace.add(Step(agent="user", role="question", action="read", writes=after.segment_ids(),
                           text_in=text, usage=Usage(prefilled=after.length), wall_s=time.perf_counter() - t0))
        return after

    def fan_out(self, ctx: RunContext, state: LatentState, agent: Agent, instructions: list[str],
                merge_policy: str) -> LatentState:
        """Latent fan-out: fork one row per instruction, each reads its own and thinks, rows merge, hand-off."""
        rows = agent.think(ctx, agent.read(ctx, state.fork(len(instructions)), instructions, fresh=False))
        return self.handoff(agent.merge(ctx, rows, merge_policy))

    def conclude(self, ctx: RunContext, agent: Agent, inp: Output, state: LatentState, *, speak: bool,
                 final: bool = True, label: str | None = None, **facts) -> Output:
        """The output agent's last move: speak (the run's answer when ``final``; a ``label``ed message too, for
        text readers) or, when a later primitive answers, leave latent thoughts. In kv mode a message that a
        later primitive reads closes its turn in the cache."""
        if speak:
            text, state = agent.speak(ctx, state, final=final, close_turn=self.comm == "kv" and not final)
            return inp.then(state, answer=text, message=(label, text) if label else None, **facts)
        return inp.then(agent.think(ctx, state), **facts)


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

    def kv_positions(self, question_tokens: int) -> int:
        return chained_kv_positions(question_tokens, self.steps)

    def continues_state(self) -> bool:
        return self.steps[0].continues_state()

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        out = inp
        for i, step in enumerate(self.steps):
            last = final and i == len(self.steps) - 1
            if step.comm == "text" and out.state.length:
                out = out.then(LatentState.empty(ctx.model))  # text mode re-reads messages, never KV
            out = step.forward(ctx, out, final=last)
        return out
