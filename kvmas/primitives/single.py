"""Single: one agent, chain of thought — the baseline every benchmark reports."""

from __future__ import annotations

from kvmas.agents.agent import Agent, RunContext
from kvmas.primitives.base import Output, Primitive


class Single(Primitive):
    """One solver answers the question directly (same prompt in both modes: there is nothing to hand off).

    >>> from kvmas.testing import tiny_model
    >>> Single(max_new_tokens=3)("2+2?", model=tiny_model()).usage.generated <= 3
    True
    """

    name = "single"

    def __init__(self, comm="latent", latent_steps: int = 0, max_new_tokens: int = 512, **kw):
        super().__init__(comm=comm, latent_steps=latent_steps, max_new_tokens=max_new_tokens, **kw)

    def continues_state(self) -> bool:
        return True  # one prompt in every mode, read on top of the input state

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        solver = Agent("solver", max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       top_p=self.top_p, latent_steps=self.latent_steps)
        state = inp.state
        if state.length == 0 and not inp.messages:
            # the plain single-agent prompt: the question alone, as a user would ask it
            state = solver.read(ctx, state, ctx.question)
        else:
            state = solver.read(ctx, self.handoff(state), "Solve the problem." if state.length else
                                self.text_context(ctx, inp) + "\n\nSolve the problem.")
        state = solver.think(ctx, state)
        if final or self.comm != "latent":
            return self.conclude(ctx, solver, inp, state, speak=True, final=final, label="Solver")
        return inp.then(state)
