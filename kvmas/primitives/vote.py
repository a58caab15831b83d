"""Vote (voting & selection): N solvers as batch rows of one forward on a shared prefix, then a selector."""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

from kvmas.agents.agent import Agent, RunContext
from kvmas.agents.state import LatentState, MERGE_POLICIES
from kvmas.errors import BadInputError
from kvmas.primitives.base import Output, Primitive, check_param
from kvmas.tasks.answers import boxed_contents, extract_choice, extract_number
from kvmas.tasks.prompts import parse_choices

PERSONAS = (
    "You are Solver {i}, a careful mathematician who checks every calculation.",
    "You are Solver {i}, a practical problem solver who writes short, clear steps.",
    "You are Solver {i}, a teacher who explains the reasoning simply.",
    "You are Solver {i}, a sceptic who looks for the trap in the question.",
    "You are Solver {i}, an engineer who estimates first and then computes exactly.",
)
SOLVE = "Solve the problem step by step."
AGGREGATES = ("selector", "majority", "likelihood")
# What each candidate answers: its persona's instruction, or the question as the single agent is asked it.
CANDIDATES = ("persona", "question")
# The selector's constrained choice scores each distinct candidate answer in this form (same words before it,
# so the scores differ only by the answer and what follows it).
ANSWER_FORM = "The final answer is \\boxed{{{}}}."
SELECT = ("You are the Selector. Several solvers worked on the problem above. Using their work as a reference, "
          "solve the problem step by step and give the single best final answer in the format the problem asks for.")


def answer_key(text: str, question: str = "") -> str | None:
    r"""A comparable answer for answer-level majority, read as the scorer reads it.

    When ``question`` lists options as ``tasks.format_question`` writes them, the key is the option label the
    reply chose (``tasks.answers.extract_choice``: "B. steam", "steam" and "\boxed{B}" are one answer).
    Otherwise numbers are read with ``extract_number``, so ``\boxed{$18}``, ``\boxed{18.00}`` and "the answer
    is 18." are one answer; a last box that holds no number (a word) is its own text. A box introduced as a
    format example ("e.g. \boxed{N}") is not an answer, as for the scorer.

    >>> [answer_key(t) for t in (r"\boxed{$18}", r"so \boxed{18.00}", "The answer is 18.", r"\boxed{B}", "hmm")]
    ['18', '18', '18', 'B', None]
    >>> answer_key(r"I will answer as e.g. \boxed{N}. The total is 12.")
    '12'
    >>> q = "Which is a gas?\nA. iron\nB. steam\nAnswer with the letter of the correct option only."
    >>> [answer_key(t, q) for t in ("B. steam", "steam", r"\boxed{B}", "A or B")]
    ['B', 'B', 'B', None]
    """
    text = text or ""
    choices = parse_choices(question) if question else None
    if choices:
        return extract_choice(text, *choices)
    boxed = [b for b in boxed_contents(text, answers_only=True) if b]
    if boxed and not re.search(r"\d", boxed[-1]):
        return boxed[-1]
    return extract_number(text)


def keys_of(texts: list[str], ctx: RunContext, key: Callable[[str], str | None] | None = None) -> list:
    """Each text's answer key: ``key(text)`` when a key was given, else :func:`answer_key` for the run's
    question."""
    return [key(t) if key else answer_key(t, ctx.question) for t in texts]


class Vote(Primitive):
    """N solvers (default 3), diverse by persona (and by seed when sampling), and a selector.

    The question is prefilled once and forked into N rows; each row reads its persona (rows are padded
    between prefix and persona, masked). Latent: solvers think ``latent_steps``; their rows are merged into one
    row with ``merge_policy`` (default ``shared``: every candidate keeps the positions it was computed at, so
    none is closer to the selector and each candidate's KV is exactly its own run; measured against exact
    re-prefill in ``kvmas bench efficiency``); the selector reads the question and all candidates. Text:
    solvers decode their solutions (still one batched forward), the selector re-reads them as text. KV: the
    solvers decode their solutions into their rows of the shared state; the rows merge (``merge_policy``) and
    the selector reads the candidates' own KV, nothing re-prefilled.
    ``aggregate="majority"`` answers with the majority answer when candidate answers are extractable and a
    strict majority exists (text candidates), else falls back to the selector. ``aggregate="likelihood"``: the
    selector reads the candidates (their KV in kv mode, their text in text mode) and makes a constrained choice
    among their distinct answers, the one whose ``ANSWER_FORM`` has the highest log-probability; the answer is
    the first candidate that gave it (no selector decode; the selector's own free answer when no candidate
    answer is extractable). ``answer_key`` maps a
    candidate's text to a comparable answer (default None: :func:`answer_key` for the run's question, the
    option label or number the scorer would read).
    ``candidates="question"`` (kv and text modes): every candidate answers the question as the single agent is
    asked it, token for token (no persona), so the candidates are samples of the single agent's answer
    (identical under greedy decoding: sample with ``temperature``); with an input conversation (a later pipeline
    stage) the personas answer, as with the default ``"persona"``.
    """

    name = "vote"

    def __init__(self, comm="latent", n: int = 3, merge_policy: str = "shared", aggregate: str = "selector",
                 answer_key: Callable[[str], str | None] | None = None, candidates: str = "persona", **kw):
        super().__init__(comm=comm, **kw)
        if candidates not in CANDIDATES:
            raise BadInputError(f"unknown candidates {candidates!r} (known: {', '.join(CANDIDATES)})")
        if candidates == "question" and comm == "latent":
            raise BadInputError("candidates='question' decodes each candidate: use comm 'kv' or 'text'")
        self.candidates = candidates
        self.answer_key = answer_key
        self.n = check_param("n", n)
        if merge_policy not in MERGE_POLICIES:
            raise BadInputError(f"unknown merge policy {merge_policy!r} (one of {', '.join(MERGE_POLICIES)})")
        if aggregate not in AGGREGATES:
            raise BadInputError(f"unknown aggregate {aggregate!r} ({'|'.join(AGGREGATES)})")
        self.merge_policy = merge_policy
        self.aggregate = aggregate

    def params(self) -> dict:
        return {**super().params(), "n": self.n, "merge_policy": self.merge_policy, "aggregate": self.aggregate,
                "candidates": self.candidates}

    def positions_needed(self, question_tokens: int) -> int:
        return question_tokens + 256 + self.n * self.turn_positions() + self.max_new_tokens

    def kv_positions(self, question_tokens: int) -> int:
        solvers = self.n * (question_tokens + 256 + self.turn_positions())  # the solvers' rows, beside the merged one
        return self.positions_needed(question_tokens) + solvers

    def _personas(self) -> list[str]:
        return [PERSONAS[i % len(PERSONAS)].format(i=i + 1) for i in range(self.n)]

    def _solver_turns(self) -> list[str]:
        """Each solver's instruction on top of the shared question (latent and kv modes)."""
        return [f"{p} {SOLVE}" for p in self._personas()]

    def _agents(self) -> tuple[Agent, Agent]:
        kw = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                  latent_steps=self.latent_steps)
        return Agent("solvers", role="solver", **kw), Agent("selector", **kw)

    def selector_state(self, ctx: RunContext, inp: Output, merge_policy: str | None = None) -> LatentState:
        """Latent: the state right before the selector answers, with the solvers' rows merged by
        ``merge_policy`` (default: this Vote's own). The merge-error check of ``kvmas bench efficiency``
        builds its states here, so it measures the state Vote really builds."""
        solvers, selector = self._agents()
        merged = self.fan_out(ctx, self.shared_prefix(ctx, inp), solvers, self._solver_turns(),
                              merge_policy or self.merge_policy)
        return selector.read(ctx, merged, self.final_instruction(ctx, SELECT), fresh=False)

    def forward(self, ctx: RunContext, inp: Output, final: bool = True) -> Output:
        solvers, selector = self._agents()
        if self.comm == "latent":
            return self.conclude(ctx, selector, inp, self.selector_state(ctx, inp), speak=final)
        base = LatentState.empty(ctx.model)
        asked = self.asked(ctx, inp) if self.candidates == "question" else None
        if asked is not None:  # the single agent's prompt, prefilled once, one row per candidate
            rows = asked.fork(self.n)
        elif self.comm == "kv":  # candidates decoded into their rows of the shared state
            rows = solvers.read(ctx, self.shared_prefix(ctx, inp).fork(self.n), self._solver_turns(), fresh=False)
        else:  # text mode: the shared problem prompt is prefilled once, candidates decoded as batch rows
            prompts = [self.text_context(ctx, inp) + "\n\n" + f"{p} {SOLVE}" for p in self._personas()]
            rows = solvers.read(ctx, base.fork(self.n), prompts, fresh=True)
        if self.comm == "kv":
            cands, rows = solvers.speak(ctx, rows, close_turn=True)
        else:
            cands, _ = solvers.speak(ctx, rows)
        cands = list(cands) if isinstance(cands, list) else [cands]
        keys = keys_of(cands, ctx, self.answer_key)
        shown = [(f"Solver {i + 1}'s solution", c) for i, c in enumerate(cands)]
        top, count = Counter(k for k in keys if k).most_common(1)[0] if any(keys) else (None, 0)
        if self.aggregate == "majority" and top is not None and count * 2 > len(keys):
            text = next(c for c, k in zip(cands, keys) if k == top)
            return inp.then(rows.select([keys.index(top)]), answer=text, message=("Selected solution", text),
                            vote_candidates=keys, vote_majority=top)
        distinct = list(dict.fromkeys(k for k in keys if k))
        if self.aggregate == "likelihood" and len(distinct) == 1:  # nothing to choose between
            return self._chosen(inp, rows, cands, keys, distinct[0], None)
        if self.comm == "kv":
            state = selector.read(ctx, solvers.merge(ctx, rows, self.merge_policy),
                                  self.final_instruction(ctx, SELECT), fresh=False)
        else:
            state = selector.read(ctx, base, self.text_context(ctx, inp, shown) + "\n\n"
                                  + self.final_instruction(ctx, SELECT))
        if self.aggregate == "likelihood" and distinct:
            scores = selector.score(ctx, state, [ANSWER_FORM.format(k) for k in distinct])
            best = max(range(len(distinct)), key=lambda i: (scores[i], -i))  # ties: the earliest answer
            return self._chosen(inp, rows, cands, keys, distinct[best], [round(x, 4) for x in scores])
        return self.conclude(ctx, selector, inp, state, speak=True, final=final, label="Selected solution",
                             vote_candidates=keys)

    def _chosen(self, inp: Output, rows: LatentState, cands: list[str], keys: list, key: str,
                scores: list[float] | None) -> Output:
        """The first candidate whose answer is ``key``, as the vote's answer (its row's state goes on)."""
        i = keys.index(key)
        facts = {"vote_candidates": keys, "vote_choice": key}
        if scores is not None:
            facts["vote_likelihoods"] = scores
        return inp.then(rows.select([i]), answer=cands[i], message=("Selected solution", cands[i]), **facts)
