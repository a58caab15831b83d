"""SelfConsistency: the single agent sampled n times on one prefilled question, the most common answer wins.

The baseline users of multi-agent systems know (Wang et al., 2022): no roles, no hand-off, just samples and a
plurality vote over their final answers. It is the bar a primitive that spends n× the decoding must clear.

>>> from kvmas.testing import tiny_model
>>> r = SelfConsistency(n=3, max_new_tokens=4)("2+2?", model=tiny_model())
>>> r.trace.method, len(r.meta["vote_candidates"])
('consistency', 3)
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from kvmas.agents.agent import Agent, RunContext
from kvmas.primitives.base import Output, Primitive, check_param
from kvmas.primitives.vote import keys_of


class SelfConsistency(Primitive):
    """``n`` samples (default 5, temperature 0.7) of Single's prompt, as batch rows of one prefilled question.

    The answer is the first sample whose answer (``answer_key``, default ``vote.answer_key`` for the run's
    question: the option label or number the scorer would read) is the most common one; ties go to the
    earliest sample, and when no sample has a readable answer the first sample is returned. ``comm`` is
    accepted for a uniform interface and changes nothing (there is nothing to hand off).
    """

    name = "consistency"

    def __init__(self, comm="latent", n: int = 5, temperature: float = 0.7, max_new_tokens: int = 512,
                 latent_steps: int = 0, answer_key: Callable[[str], str | None] | None = None, **kw):
        super().__init__(comm=comm, latent_steps=latent_steps, max_new_tokens=max_new_tokens,
                         temperature=temperature, **kw)
        self.n = check_param("n", n)
        self.answer_key = answer_key

    @property
    def method(self) -> str:
        return self.name

    def params(self) -> dict:
        return {**super().params(), "n": self.n}

    def kv_positions(self, question_tokens: int) -> int:
        return self.n * self.positions_needed(question_tokens)  # one row per sample

    def continues_state(self) -> bool:
        return True  # one prompt in every mode, read on top of the input state

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        solver = Agent("solver", max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                       top_p=self.top_p)
        state = inp.state
        if state.length == 0 and not inp.messages:
            state = solver.read(ctx, state, ctx.question)  # Single's prompt, prefilled once
        else:
            state = solver.read(ctx, self.handoff(state), "Solve the problem." if state.length else
                                self.text_context(ctx, inp) + "\n\nSolve the problem.")
        texts, rows = solver.speak(ctx, state.fork(self.n))
        texts = texts if isinstance(texts, list) else [texts]
        keys = keys_of(texts, ctx, self.answer_key)
        counts = Counter(k for k in keys if k is not None)
        pick = keys.index(max(counts, key=lambda k: (counts[k], -keys.index(k)))) if counts else 0
        return inp.then(rows.select([pick]), answer=texts[pick], message=("Most consistent solution", texts[pick]),
                        vote_candidates=keys, consistency_pick=pick)
