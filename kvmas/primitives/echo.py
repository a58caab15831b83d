"""Detect collapsed answers: an output agent that copies a role instruction instead of answering.

Latent hand-offs can make a small model repeat the last instruction in its context ("You are the Critic. ...").
Benchmarks count such answers, so that a speed-up bought by echoed prompts cannot hide behind short answers.

>>> echoes_role_prompt("You are the Critic. Check the Solver's solution above for mistakes.")
True
>>> echoes_role_prompt("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. \\\\boxed{18}")
False
"""

from __future__ import annotations

import re

from kvmas.primitives import plan, review, vote


def _openings() -> list[str]:
    texts = [review.SOLVE, review.CRITIQUE, review.REFINE, review.FINAL, plan.PLAN, plan.INTEGRATE, vote.SELECT]
    texts += [plan.EXECUTE.split("{")[0], *[p.split("{")[0] for p in vote.PERSONAS]]
    # the first sentence of each instruction, normalised; at least 3 words so that ordinary prose does not match
    first = {_norm(re.split(r"(?<=\.)\s", t)[0]) for t in texts}
    return sorted(f for f in first if len(f.split()) >= 3)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower().replace("’", "'")).split())


ROLE_OPENINGS = _openings()


def echoes_role_prompt(answer: str | None) -> bool:
    """True when ``answer`` contains the opening of one of the primitives' role instructions."""
    if not answer:
        return False
    text = _norm(answer)
    return any(o in text for o in ROLE_OPENINGS)
