"""Review: solver -> critic -> solver, for ``rounds`` rounds, with an early stop when the critic agrees."""

from __future__ import annotations

from kvmas.agents.agent import Agent, RunContext
from kvmas.agents.state import LatentState
from kvmas.errors import BadInputError
from kvmas.primitives.base import Output, Primitive, check_param
from kvmas.primitives.vote import answer_key

SOLVE = "You are the Solver. Work out the solution to the problem step by step."
CRITIQUE = ("You are the Critic. Check the Solver's solution above for mistakes in reasoning or arithmetic. "
            "Point out each error, or say that the solution is correct.")
REFINE = ("You are the Solver. Taking the Critic's feedback into account, solve the problem again step by step "
          "and give the final answer in the format the problem asks for.")
FINAL = ("You are the Solver. Solve the problem step by step and give the final answer in the format the "
         "problem asks for.")
# Same words up to the verdict, so the score difference is log P(correct) - log P(incorrect) at that point.
VERDICTS = ("The solution is correct.", "The solution is incorrect.")
# What the first draft answers: the question as the single agent is asked it, or the Solver's role instruction.
DRAFTS = ("question", "solver")


class Review(Primitive):
    """Solver drafts, critic reviews, solver refines; ``rounds`` critic/refine rounds (default 2).

    Latent: the critic reads the solver's state (one continuous stream: positions are exact) and answers with
    latent steps; the solver refines on top; the previous round's critique segments are dropped. Text: drafts
    and critiques are decoded and re-read. KV: the same conversation as text, but every draft and critique is
    decoded into the one shared state and read there (nothing is re-prefilled; nothing is dropped).
    Early stop (``early_stop``, off by default): before a critic writes, its state
    scores the two verdicts in ``VERDICTS``; if "correct" wins by ``stop_margin`` nats the rounds end.
    ``draft``: what a fresh review's first draft answers, ``"solver"`` (the problem, then the Solver's ``SOLVE``)
    or ``"question"`` (the question as the single agent is asked it: the draft is the single agent's answer).
    """

    name = "review"

    # early_stop is opt-in: measured on smollm2-135m (GSM8K dev 0-19) the verdict margin exceeded 2 nats on 20/20
    # questions, so the rule ended every review after the draft without discriminating anything.
    def __init__(self, comm="latent", rounds: int = 2, early_stop: bool = False, stop_margin: float = 2.0,
                 draft: str = "solver", **kw):
        super().__init__(comm=comm, **kw)
        self.rounds = check_param("rounds", rounds)
        if draft not in DRAFTS:
            raise BadInputError(f"unknown draft {draft!r} (known: {', '.join(DRAFTS)})")
        self.draft = draft
        self.early_stop = early_stop
        self.stop_margin = stop_margin

    def params(self) -> dict:
        return {**super().params(), "rounds": self.rounds, "early_stop": self.early_stop,
                "stop_margin": self.stop_margin, "draft": self.draft}

    def positions_needed(self, question_tokens: int) -> int:
        if self.comm == "kv":  # the whole conversation stays in one state
            return question_tokens + 256 + (1 + 2 * self.rounds) * (128 + self.max_new_tokens)
        per_round = 2 * (128 + self.latent_steps) if self.comm == "latent" else 3 * self.max_new_tokens
        return question_tokens + 256 + self.latent_steps + self.rounds * per_round + self.max_new_tokens

    def _agents(self):
        kw = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                  latent_steps=self.latent_steps)
        return Agent("solver", **kw), Agent("critic", **kw)

    def _draft_state(self, ctx: RunContext, solver: Agent, inp: Output) -> LatentState:
        """The state the first draft is decoded (or thought) on. ``draft="question"``: the question as the
        single agent is asked it, so a fresh review's draft is the single agent's answer; with an input
        conversation (a later pipeline stage), or ``draft="solver"``: the problem, then the Solver's ``SOLVE``
        (text mode: re-read from a fresh cache)."""
        asked = self.asked(ctx, inp) if self.draft == "question" else None
        if asked is not None:
            return asked
        if self.comm == "text":
            return solver.read(ctx, LatentState.empty(ctx.model), self.text_context(ctx, inp) + "\n\n" + SOLVE)
        return solver.read(ctx, self.shared_prefix(ctx, inp), SOLVE)

    def _critic_agrees(self, ctx: RunContext, critic: Agent, state: LatentState, margins: list[float]) -> bool:
        """Early stop: before the critic writes, its state scores the two verdicts (a recorded step)."""
        if not self.early_stop:
            return False
        good, bad = critic.score(ctx, state, list(VERDICTS))
        margins.append(round(good - bad, 3))
        return good - bad > self.stop_margin

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        if self.comm == "text":
            return self._text(ctx, inp, final)
        if self.comm == "kv":
            return self._kv(ctx, inp, final)
        solver, critic = self._agents()
        state = solver.think(ctx, self._draft_state(ctx, solver, inp))
        critique_ids: list[int] = []
        margins: list[float] = []
        stopped = None
        for r in range(self.rounds):
            for sid in critique_ids:  # the old critique is absorbed by the refinement: drop it
                if sid in state.segment_ids():  # (its prompt may be gone already: handoff)
                    state = state.drop(sid)
            before = set(state.segment_ids())
            state = critic.read(ctx, self.handoff(state), CRITIQUE)
            if self._critic_agrees(ctx, critic, state, margins):
                stopped = r
                state = state.drop(state.segments[-1].id)
                break
            state = critic.think(ctx, state)
            critique_ids = [i for i in state.segment_ids() if i not in before]
            state = solver.read(ctx, self.handoff(state), self.final_instruction(ctx, REFINE))
            if r < self.rounds - 1:
                state = solver.think(ctx, state)
        if state.segments[-1].role != "solver" or state.segments[-1].kind != "prompt":
            state = solver.read(ctx, self.handoff(state), self.final_instruction(ctx, FINAL))
        return self.conclude(ctx, solver, inp, state, speak=final, **self._facts(margins, stopped))

    def _facts(self, margins: list[float], stopped: int | None, drafts: list | None = None) -> dict:
        """What the review did: the round an early stop ended it, the verdict margins, and the answer of each
        decoded draft the critic read (``review_drafts``; so a study can see whether refinement fixed or broke)."""
        facts: dict = {"review_stopped_at_round": stopped}
        if margins:
            facts["review_verdict_margins"] = margins
        if drafts is not None:
            facts["review_drafts"] = drafts
        return facts

    def _kv(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        solver, critic = self._agents()
        margins: list[float] = []
        draft, state = solver.speak(ctx, self._draft_state(ctx, solver, inp), close_turn=True)
        drafts = []
        for r in range(self.rounds):
            drafts.append(answer_key(draft, ctx.question))
            state = critic.read(ctx, state, CRITIQUE)
            if self._critic_agrees(ctx, critic, state, margins):  # the accepted draft is the answer
                state = state.drop(state.segments[-1].id)
                return inp.then(state, answer=draft, message=("Reviewed solution", draft),
                                **self._facts(margins, r, drafts))
            _, state = critic.speak(ctx, state, close_turn=True)
            state = solver.read(ctx, state, self.final_instruction(ctx, REFINE))
            if r < self.rounds - 1:
                draft, state = solver.speak(ctx, state, close_turn=True)
        return self.conclude(ctx, solver, inp, state, speak=True, final=final, label="Reviewed solution",
                             **self._facts(margins, None, drafts))

    def _text(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        solver, critic = self._agents()
        empty = LatentState.empty(ctx.model)
        margins: list[float] = []
        stopped = None
        draft, state = solver.speak(ctx, self._draft_state(ctx, solver, inp))
        drafts = []
        for r in range(self.rounds):
            drafts.append(answer_key(draft, ctx.question))
            shown = [("Solver's solution", draft)]
            cstate = critic.read(ctx, empty, self.text_context(ctx, inp, shown) + "\n\n" + CRITIQUE)
            if self._critic_agrees(ctx, critic, cstate, margins):
                stopped = r
                break
            critique, _ = critic.speak(ctx, cstate)
            shown.append(("Critic's feedback", critique))
            draft, state = solver.speak(ctx, solver.read(
                ctx, empty, self.text_context(ctx, inp, shown) + "\n\n" + self.final_instruction(ctx, REFINE)),
                final=final and r == self.rounds - 1)  # the last refinement is the answer
        return inp.then(state, answer=draft, message=("Reviewed solution", draft),
                        **self._facts(margins, stopped, drafts))
