"""Agents: roles bound to the shared model. They read, think and speak on LatentStates; every call is a Step.

>>> from kvmas.testing import tiny_model
>>> from kvmas.agents.agent import Agent, RunContext
>>> from kvmas.agents.state import LatentState
>>> ctx = RunContext(model=tiny_model(), question="2+3?")
>>> solver = Agent("solver", persona="You solve problems.", max_new_tokens=5)
>>> s = solver.read(ctx, LatentState.empty(ctx.model), "What is 2+3?")
>>> text, s = solver.speak(ctx, s)
>>> [step.action for step in ctx.trace.steps]
['read', 'speak']
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from kvmas.agents.state import LatentState, MergePolicy
from kvmas.agents.stream import TextStream
from kvmas.errors import BadInputError
from kvmas.trace import Step, Trace, Usage


@dataclass
class Intervention:
    """A counterfactual change to one agent's contribution (attribution replays, planted faults).

    kind ``ablate``: the agent contributes nothing (no prompt, no thoughts, empty text).
    kind ``replace``: the agent's spoken text (or, in latent mode, its thoughts) is replaced by ``text``.
    ``steps``: trace step indices it applies to (None = every call of that agent).
    """

    kind: Literal["ablate", "replace"]
    text: str = ""
    steps: set[int] | None = None

    def applies(self, step_index: int) -> bool:
        return self.steps is None or step_index in self.steps


class SkillSource(Protocol):
    """What an agent consults at each turn for a procedural skill (``kvmas.memory.runtime.SkillMemory``)."""

    def select(self, question: str, instruction: str, rng) -> tuple[Any, dict]:
        """(a skill with ``id``, ``name`` and ``render()``, or None; facts about the choice)."""


@dataclass
class RunContext:
    """A run's inputs and the trace being written; outputs flow as values (``kvmas.primitives.run.Output``).

    Open one with ``kvmas.primitives.run.open_run`` (it checks the question and the context size).
    """

    model: Any
    question: str = ""
    seed: int = 0
    system: str = "You are a helpful assistant."
    trace: Trace = field(default_factory=Trace)
    interventions: dict[str, "Intervention | list[Intervention]"] = field(default_factory=dict)
    skills: SkillSource | None = None
    started: float = field(default_factory=time.perf_counter)
    trace_path: Any = None  # where close_run writes the trace, if anywhere
    # called as listener(agent, text_delta, final) while an agent speaks (one row: its text as it is decoded;
    # several rows: "" per tick); ``final``: the speech is the run's answer. Raising from it stops the run.
    listener: Any = None
    _credited: dict[str, set[int]] = field(default_factory=dict)
    _adopted: set[tuple] = field(default_factory=set)  # segments of a state the run started from (resume)

    def intervention(self, agent: str) -> Intervention | None:
        """The intervention on ``agent`` that applies to the step about to be recorded (first match)."""
        ivs = self.interventions.get(agent)
        for iv in ivs if isinstance(ivs, list) else [ivs] if ivs is not None else []:
            if iv.applies(len(self.trace.steps)):
                return iv
        return None

    def reused_for(self, agent: str, state: LatentState) -> int:
        """Positions of ``state`` written by other agents that ``agent`` reads for the first time.

        A shared (forked) prefix counts once, however many rows read it; a segment is credited to an agent
        once per run, so re-reading one's own growing state is never counted as reuse. Segments of a state
        the run started from (:meth:`adopt`) were counted when it was adopted, and never again.
        """
        seen = self._credited.setdefault(agent, set())
        total = 0
        for seg in state.segments:
            if seg.agent == agent or seg.id in seen or _identity(seg) in self._adopted:
                continue
            seen.add(seg.id)
            total += _positions(state, seg)
        return total

    def adopt(self, state: LatentState) -> int:
        """Positions of ``state``, a state this run starts from instead of computing it (a saved one): the
        step that reads it counts them as reused, once, whichever agents wrote them and whoever reads them
        later."""
        self._adopted.update(_identity(seg) for seg in state.segments)
        return sum(_positions(state, seg) for seg in state.segments)


def _identity(seg) -> tuple:
    """A segment told apart from one a fresh state of the same run numbers alike (ids count per lineage)."""
    return seg.id, seg.agent, seg.role, seg.kind, seg.length


def _positions(state: LatentState, seg) -> int:
    """The positions of ``seg`` that ``state``'s rows hold (a shared prefix once; masked padding not)."""
    if seg.start + seg.length <= state.shared_cols:
        return seg.length
    return int(state.mask[:, seg.start: seg.start + seg.length].sum())


@dataclass
class Agent:
    """A role: name, persona and generation parameters, bound at call time to the context's model.

    The chat system message is the run's (``RunContext.system``); the persona opens the agent's user turn, so
    the same words reach the model whether the turn starts a conversation or continues a shared one.
    """

    name: str
    role: str = ""
    persona: str = ""  # who this agent is; rendered at the top of each of its turns
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    latent_steps: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.role = self.role or self.name
        if self.max_new_tokens <= 0:
            raise BadInputError(f"agent {self.name}: max_new_tokens must be > 0")
        if self.latent_steps < 0:
            raise BadInputError(f"agent {self.name}: latent_steps must be >= 0")

    # -- prompts -----------------------------------------------------------------------------
    def message(self, instruction: str) -> str:
        """The text of this agent's user message (persona, then instruction): what a trace shows it read."""
        return f"{self.persona}\n\n{instruction}" if self.persona else instruction

    def turn(self, ctx: RunContext, instruction: str, *, fresh: bool = True) -> str:
        """This agent's turn as chat text.

        ``fresh``: a whole conversation (system + user + generation prompt). Otherwise a continuation of a
        conversation already in the state: only the user message and the generation prompt (the template's
        system part is rendered and stripped, so templates that add a default system prompt do not repeat it).
        """
        model = ctx.model
        sys_msg = {"role": "system", "content": ctx.system}
        content = self.message(instruction)
        full = model.chat_text([sys_msg, {"role": "user", "content": content}])
        if fresh:
            return full
        head = model.chat_text([sys_msg], add_generation_prompt=False)
        return full[len(head):] if full.startswith(head) else full

    # -- recorded actions -------------------------------------------------------------------------
    def _record(self, ctx: RunContext, action: str, before: LatentState, after: LatentState, t0: float,
                usage: Usage, text_in=None, text_out=None, **meta) -> None:
        old = set(before.segment_ids())
        ctx.trace.add(Step(
            agent=self.name, role=self.role, action=action, reads=before.segment_ids(),
            writes=[i for i in after.segment_ids() if i not in old], rows=before.rows or after.rows,
            text_in=text_in, text_out=text_out, usage=usage, wall_s=time.perf_counter() - t0, meta=meta,
        ))

    def read(self, ctx: RunContext, state: LatentState, instruction: str | list[str], *,
             fresh: bool | None = None) -> LatentState:
        """Prefill this agent's turn on top of ``state`` (per row when ``instruction`` is a list).

        ``fresh`` (default: the state is empty) renders a whole conversation, else a continuation turn.
        """
        t0 = time.perf_counter()
        iv = ctx.intervention(self.name)
        if iv is not None and iv.kind == "ablate":
            self._record(ctx, "read", state, state, t0, Usage(), text_in=None, intervention="ablate")
            return state
        fresh = state.length == 0 if fresh is None else fresh
        skill_meta = {}
        if ctx.skills is not None:  # a procedural skill that applies opens the turn (rendered text, never run)
            import random

            first = instruction[0] if isinstance(instruction, list) else instruction
            skill, info = ctx.skills.select(ctx.question, first, random.Random(ctx.seed))
            if skill is not None:
                block = skill.render() + "\n\n"
                instruction = [block + i for i in instruction] if isinstance(instruction, list) else block + instruction
                skill_meta = {"skill": skill.id, "skill_name": skill.name, **info}
        text = ([self.turn(ctx, i, fresh=fresh) for i in instruction] if isinstance(instruction, list)
                else self.turn(ctx, instruction, fresh=fresh))
        reused = ctx.reused_for(self.name, state)
        after = state.extend(text, agent=self.name, role=self.role, kind="prompt")
        prefilled = sum(len(r) for r in after.segments[-1].token_ids)
        shown = text if isinstance(text, str) else "\n---\n".join(text)
        message = "\n---\n".join(self.message(i) for i in (instruction if isinstance(instruction, list)
                                                          else [instruction]))
        self._record(ctx, "read", state, after, t0, Usage(prefilled=prefilled, reused=reused), text_in=shown,
                     message=message, **skill_meta)
        return after

    def think(self, ctx: RunContext, state: LatentState, steps: int | None = None) -> LatentState:
        """Latent steps on top of ``state``; a ``replace`` intervention prefills its text instead."""
        steps = self.latent_steps if steps is None else steps
        if steps == 0:  # no thinking step exists, so nothing to intervene on (keeps step indices aligned)
            return state
        t0 = time.perf_counter()
        iv = ctx.intervention(self.name)
        if iv is not None:
            after = state if iv.kind == "ablate" else state.extend(iv.text or " ", agent=self.name,
                                                                    role=self.role, kind="text")
            pre = 0 if after is state else sum(len(r) for r in after.segments[-1].token_ids)
            self._record(ctx, "think", state, after, t0, Usage(prefilled=pre), text_out=iv.text or None,
                         intervention=iv.kind)
            return after
        reused = ctx.reused_for(self.name, state)
        after = state.think(steps, agent=self.name, role=self.role)
        self._record(ctx, "think", state, after, t0, Usage(latent=steps * state.rows, reused=reused),
                     steps=steps)
        return after

    def score(self, ctx: RunContext, state: LatentState, continuations: list[str]) -> list[float]:
        """Log-probability of each continuation after ``state`` (a constrained choice), recorded as a step."""
        t0 = time.perf_counter()
        reused = ctx.reused_for(self.name, state)
        scores = state.score(continuations)
        # score() reads each continuation's first token from the state's head; the rest go through the model
        fed = sum(max(0, len(ctx.model.encode(c)) - 1) for c in continuations)
        self._record(ctx, "score", state, state, t0, Usage(prefilled=fed, reused=reused),
                     text_in="\n".join(continuations), scores=[round(x, 4) for x in scores])
        return scores

    def merge(self, ctx: RunContext, branches: LatentState | list[LatentState],
              policy: MergePolicy) -> LatentState:
        """Rows of one state (or single-row branches) merged into one row by ``policy``, recorded as a step.

        ``reprefill`` recomputes every branch's positions on top of the shared prefix: those count as prefilled.
        """
        t0 = time.perf_counter()
        parts = [branches.select([i]) for i in range(branches.rows)] if isinstance(branches, LatentState) \
            else list(branches)
        merged = LatentState.merge(parts, policy=policy)
        # the merge writes the reader's whole context (it laid out, and for reprefill recomputed, every column)
        ctx.trace.add(Step(agent=self.name, role=self.role, action="merge",
                           reads=sorted({i for b in parts for i in b.segment_ids()}), writes=merged.segment_ids(),
                           rows=len(parts),
                           usage=Usage(prefilled=LatentState.merge_cost(parts, policy)),
                           wall_s=time.perf_counter() - t0,
                           meta={"policy": policy, "branches": len(parts), "columns": merged.length}))
        return merged

    def speak(self, ctx: RunContext, state: LatentState, *, max_new_tokens: int | None = None,
              seed: int | None = None, final: bool = False,
              close_turn: bool = False) -> tuple[list[str] | str, LatentState]:
        """Decode from every row; returns (text, or a list of texts for several rows) and the new state.

        ``final``: this speech is the run's answer (``ctx.listener`` is told so with every delta).
        ``close_turn``: the message stays in the cache for the next agent (``comm="kv"``), so the chat
        template's end of an assistant turn (``Model.turn_end``) is prefilled after it, in the same step.
        """
        t0 = time.perf_counter()
        iv = ctx.intervention(self.name)
        if iv is not None:
            texts = [iv.text if iv.kind == "replace" else ""] * state.rows
            after = state.extend(iv.text, agent=self.name, role=self.role, kind="generated") if iv.text else state
            pre = 0 if after is state else sum(len(r) for r in after.segments[-1].token_ids)
            if close_turn:
                after, closing = self._close_turn(ctx, after)
                pre += closing
            self._record(ctx, "speak", state, after, t0, Usage(prefilled=pre), text_out=texts[0],
                         intervention=iv.kind)
            if ctx.listener is not None and state.rows == 1 and texts[0]:
                ctx.listener(self.name, texts[0], final)
            return (texts[0] if state.rows == 1 else texts), after
        reused = ctx.reused_for(self.name, state)
        on_token, stream = None, None
        if ctx.listener is not None:
            listener = ctx.listener
            if state.rows == 1:
                stream = TextStream(ctx.model, self.stop)
                on_token = lambda row, tok: listener(self.name, stream.push(tok), final)  # noqa: E731
            else:
                on_token = lambda row, tok: listener(self.name, "", final)  # noqa: E731
        sp = state.speak(
            max_new_tokens or self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            seed=ctx.seed if seed is None else seed, stop=self.stop, agent=self.name, role=self.role,
            on_token=on_token,
        )
        if stream is not None:
            rest = stream.close(sp.texts[0])
            if rest:
                ctx.listener(self.name, rest, final)
        gen = sum(len(r) for r in sp.token_ids)
        after, closing = self._close_turn(ctx, sp.state) if close_turn else (sp.state, 0)
        shown = sp.texts[0] if state.rows == 1 else "\n---\n".join(sp.texts)
        self._record(ctx, "speak", state, after, t0,
                     Usage(generated=gen, prefilled=closing + sp.prefilled, reused=reused),
                     text_out=shown, tokens=[len(r) for r in sp.token_ids])
        return (sp.texts[0] if state.rows == 1 else sp.texts), after

    def _close_turn(self, ctx: RunContext, state: LatentState) -> tuple[LatentState, int]:
        """The template's end of an assistant turn prefilled after every row's message (positions per row)."""
        end = ctx.model.turn_end
        if not end or state.length == 0:
            return state, 0
        after = state.extend(end, agent=self.name, role=self.role, kind="text")
        return after, sum(len(r) for r in after.segments[-1].token_ids)
